// Command vcsim runs govmomi's vSphere API simulator for patchd's test bed.
//
// Debian ships govmomi's simulator package as source only (no vcsim command), so
// tests/lab/lab.sh builds this file against it:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o vcsim main.go
//
// Written against govmomi 0.24.2 (golang-github-vmware-govmomi-dev in bookworm).
//
// On start it prints exactly one line to stdout, the service URL (with user:pass),
// e.g. "http://user:pass@127.0.0.1:40123/sdk", then serves until SIGTERM or SIGINT.
// With -listen 127.0.0.1:0 the kernel picks the port; read it from that line.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"

	// Registers the REST (vAPI) endpoints: tags, categories, ... under /rest.
	_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("vcsim: ")

	m := simulator.VPX()

	flag.IntVar(&m.Datacenter, "dc", m.Datacenter, "number of datacenters")
	flag.IntVar(&m.Cluster, "cluster", m.Cluster, "number of clusters per datacenter")
	flag.IntVar(&m.ClusterHost, "host", m.ClusterHost, "number of hosts per cluster")
	flag.IntVar(&m.Host, "standalone-host", m.Host, "number of standalone hosts per datacenter")
	flag.IntVar(&m.Machine, "vm", m.Machine,
		"number of VMs per cluster root resource pool and per standalone host")
	flag.IntVar(&m.Pool, "pool", m.Pool, "number of extra resource pools per cluster (they get no VMs)")
	flag.IntVar(&m.Datastore, "ds", m.Datastore, "number of local datastores")
	flag.BoolVar(&m.Autostart, "autostart", m.Autostart, "power on the model's VMs")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: any free port)")
	certFile := flag.String("tls-cert", "", "PEM certificate: serve HTTPS with it (needs -tls-key)")
	keyFile := flag.String("tls-key", "", "PEM private key for -tls-cert")
	trace := flag.Bool("trace", false, "write the SOAP requests and responses to stderr (or -trace-file)")
	traceFile := flag.String("trace-file", "", "with -trace: append the SOAP trace to this file instead of stderr")
	flag.Parse()

	if flag.NArg() != 0 {
		log.Fatalf("unexpected arguments: %q", flag.Args())
	}
	if (*certFile == "") != (*keyFile == "") {
		log.Fatal("-tls-cert and -tls-key must be given together")
	}

	if *trace {
		simulator.Trace = true
		if *traceFile != "" {
			f, err := os.OpenFile(*traceFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
			if err != nil {
				log.Fatalf("trace file: %v", err)
			}
			defer f.Close()
			simulator.TraceFile = f
		}
	}

	// Create the inventory first: Create() makes m.Service.
	if err := m.Create(); err != nil {
		log.Fatalf("creating the model: %v", err)
	}
	// Remove() deletes the datastores' temp directories (created under $TMPDIR).
	defer m.Remove()

	m.Service.Listen = &url.URL{Host: *listen}
	m.Service.RegisterEndpoints = true

	if *certFile != "" {
		// The simulator's built-in certificate is RSA-1024, which OpenSSL 3 refuses:
		// always give our own.
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("loading TLS certificate: %v", err)
		}
		m.Service.TLS = new(tls.Config)
		m.Service.TLS.Certificates = []tls.Certificate{cert}
	}

	// Set up the signal handler before announcing the URL, so a client that reads
	// the URL and stops us at once is never lost.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)

	// NewServer panics if it cannot listen (e.g. the port is taken): the process
	// then exits non-zero with the reason on stderr, which lab.sh shows.
	s := m.Service.NewServer()

	fmt.Println(s.URL.String())
	count := m.Count()
	log.Printf("serving %s: %d datacenters, %d clusters, %d hosts, %d VMs",
		s.URL.Redacted(), count.Datacenter, count.Cluster, count.Host, count.Machine)

	got := <-sig
	log.Printf("%s: shutting down", got)
	s.Close()
}
