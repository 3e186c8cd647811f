// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"time"
)

// The TLS side of the SNI scenario: one self-signed certificate made at
// start, for the server names the SNI routes choose by, served by the TLS
// backends and trusted by the load tool's clients. The proxies never see a
// key: they pass the TLS bytes through, choosing the backend by the name in
// the ClientHello.

// sniNames maps each TLS backend to the server name that routes to it. Four
// names on one listener: the matcher really chooses.
var sniNames = map[backendKind]string{
	kindTLSEcho:   "echo.bench.test",
	kindTLSSink:   "sink.bench.test",
	kindTLSSource: "source.bench.test",
	kindTLSHold:   "hold.bench.test",
}

// tlsKinds are the TLS backends, in the order of the SNI routes.
var tlsKinds = []backendKind{kindTLSSink, kindTLSSource, kindTLSEcho, kindTLSHold}

// tlsConfigs are the server and client configs of a run.
type tlsConfigs struct {
	server *tls.Config
	roots  *x509.CertPool
}

// newTLSConfigs makes an ECDSA P-256 certificate for every name of sniNames,
// valid for a day. TLS 1.3 with Go's defaults (X25519MLKEM768 first, as
// browsers send): a full handshake on every connection, as session tickets
// are off and the clients keep no session cache.
func newTLSConfigs() (*tlsConfigs, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tls key: %w", err)
	}
	names := make([]string, 0, len(sniNames))
	for _, k := range tlsKinds {
		names = append(names, sniNames[k])
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               pkix.Name{CommonName: "caddy-godist load benchmark"},
		DNSNames:              names,
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("tls certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tls certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	return &tlsConfigs{
		server: &tls.Config{
			Certificates:           []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}},
			MinVersion:             tls.VersionTLS13,
			SessionTicketsDisabled: true,
		},
		roots: roots,
	}, nil
}

// client returns a client config for one server name, verifying the
// backend's certificate as a real client would.
func (tc *tlsConfigs) client(serverName string) *tls.Config {
	return &tls.Config{ServerName: serverName, RootCAs: tc.roots, MinVersion: tls.VersionTLS13}
}
