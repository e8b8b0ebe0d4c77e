// Command loadgen sends unary gRPC calls (/test.Echo/Unary, raw bytes) and reports JSON:
// requests, errors, seconds, rps and latency percentiles in microseconds.
//
// Closed loop (throughput at fixed concurrency):  loadgen -targets A,B -concurrency 64 -duration 10s
// Open loop (latency at a fixed rate):            loadgen -targets A -rate 2000 -duration 10s
//
// Several targets are used round robin, one connection each (the "direct" case); -authority
// sets :authority (how the proxies route).
//
// Over TLS (bench/compare.py's -tls targets):
//
//	loadgen -targets A -tls-ca ca.crt -tls-server-name localhost …
//
// trusts only that CA, verifies the server's certificate for the name given (:authority and
// SNI stay -authority), and offers TLS 1.3 only with X25519 key exchange (Go does not let a
// client choose TLS 1.3 cipher suites; on a CPU with AES instructions it prefers
// TLS_AES_128_GCM_SHA256). What each connection negotiated is reported in the JSON ("tls":
// version, suite, group, ALPN, server key).
//
// For the fault benchmark (bench/faults.py), with -rate:
//
//	loadgen -targets A -rate 1000 -duration 10s -start-at UNIX_NS -record calls.csv [-hold-stream]
//
// -start-at begins the measured calls at that wall-clock time (after the warm-up), so that the
// caller can time faults against it; -record writes one line per measured call,
// "start_unix_ns,latency_us,grpc_code,x-backend" (x-backend from the headers, else the trailers,
// else empty); -hold-stream holds one server-streaming call (/test.Echo/Stream) open through
// the target for the whole run and reports how it ended ("stream" in the JSON).
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"weighbridge.local/bench/rawcodec"
)

type result struct {
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	Seconds  float64 `json:"seconds"`
	RPS      float64 `json:"rps"`
	P50us    float64 `json:"p50_us"`
	P90us    float64 `json:"p90_us"`
	P99us    float64 `json:"p99_us"`
	MaxUs    float64 `json:"max_us"`
	// StartUnixNs is when the measured calls began (wall clock).
	StartUnixNs int64         `json:"start_unix_ns"`
	Stream      *streamResult `json:"stream,omitempty"`
	// TLS is what the connections negotiated (-tls-ca), each distinct state once.
	TLS []string `json:"tls,omitempty"`
}

// streamResult is how the held server-streaming call (-hold-stream) went.
type streamResult struct {
	Messages int64  `json:"messages"`
	Backend  string `json:"backend"`
	// Code is the call's gRPC status code when it ended before the end of the run; 0 when it
	// was held to the end (and then cancelled by the load generator).
	Code codes.Code `json:"code"`
	// EndedS is when it ended by itself, in seconds after the start; -1 when held to the end.
	EndedS  float64 `json:"ended_s"`
	Message string  `json:"message,omitempty"`
}

// record is one measured call (-record).
type record struct {
	start   time.Time
	elapsed time.Duration
	code    codes.Code
	backend string
}

func main() {
	targets := flag.String("targets", "127.0.0.1:8080", "comma-separated HOST:PORT, used round robin")
	authority := flag.String("authority", "", ":authority to send (default: the target)")
	concurrency := flag.Int("concurrency", 32, "calls in flight (closed loop)")
	rate := flag.Float64("rate", 0, "calls per second (open loop); 0 = closed loop")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	size := flag.Int("size", 64, "request payload bytes")
	conns := flag.Int("connections", 1, "connections per target")
	callTimeout := flag.Duration("call-timeout", 5*time.Second, "deadline of each open-loop call and of each warm-up call")
	recordPath := flag.String("record", "", "write each measured call (start, latency, code, backend) to this CSV file")
	startAt := flag.Int64("start-at", 0, "begin measuring at this time (Unix ns); 0: after the warm-up")
	holdStream := flag.Bool("hold-stream", false, "hold one /test.Echo/Stream call open for the whole run")
	tlsCA := flag.String("tls-ca", "", "connect over TLS 1.3, trusting this PEM CA bundle; default plaintext h2c")
	tlsServerName := flag.String("tls-server-name", "", "with -tls-ca: the name the server's certificate must have (default: -authority, else the target)")
	flag.Parse()

	creds := insecure.NewCredentials()
	if *tlsCA != "" {
		c, err := tlsCredentials(*tlsCA, *tlsServerName)
		if err != nil {
			log.Fatal(err)
		}
		creds = c
	}
	var clients []*grpc.ClientConn
	for _, t := range strings.Split(*targets, ",") {
		for i := 0; i < *conns; i++ {
			opts := []grpc.DialOption{
				grpc.WithTransportCredentials(creds),
				grpc.WithDefaultCallOptions(grpc.ForceCodec(rawcodec.Codec{})),
			}
			if *authority != "" {
				opts = append(opts, grpc.WithAuthority(*authority))
			}
			cc, err := grpc.NewClient(t, opts...)
			if err != nil {
				log.Fatal(err)
			}
			clients = append(clients, cc)
		}
	}
	payload := make([]byte, *size)
	var next, requests, failures atomic.Int64
	var mu sync.Mutex
	var latencies []time.Duration
	var records []record
	call := func(ctx context.Context, extra ...grpc.CallOption) {
		cc := clients[int(next.Add(1))%len(clients)]
		var resp []byte
		var header, trailer metadata.MD
		opts := extra
		if *recordPath != "" {
			opts = append(opts, grpc.Header(&header), grpc.Trailer(&trailer))
		}
		start := time.Now()
		err := cc.Invoke(ctx, "/test.Echo/Unary", payload, &resp, opts...)
		elapsed := time.Since(start)
		requests.Add(1)
		if *recordPath != "" {
			r := record{start, elapsed, status.Code(err), first(header, trailer, "x-backend")}
			mu.Lock()
			records = append(records, r)
			mu.Unlock()
		}
		if err != nil {
			failures.Add(1)
			if ctx.Err() == nil {
				return
			}
			// Timed out (an overloaded target in open loop): count it at the deadline so the
			// percentiles show the overload instead of hiding it.
		}
		mu.Lock()
		latencies = append(latencies, elapsed)
		mu.Unlock()
	}
	// Warm up every connection before measuring (each call bounded by -call-timeout), and
	// note what each negotiated over TLS.
	var negotiated []string
	for range clients {
		ctx, cancel := context.WithTimeout(context.Background(), *callTimeout)
		var p peer.Peer
		call(ctx, grpc.Peer(&p))
		cancel()
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			if s := describe(info.State); !slices.Contains(negotiated, s) {
				negotiated = append(negotiated, s)
			}
		}
	}
	requests.Store(0)
	failures.Store(0)
	latencies = latencies[:0]
	records = records[:0]
	if *startAt > 0 {
		time.Sleep(time.Until(time.Unix(0, *startAt)))
	}

	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	var held *streamResult
	if *holdStream {
		held = &streamResult{EndedS: -1}
		wg.Add(1)
		go func() {
			defer wg.Done()
			hold(ctx, clients[0], payload, start, held)
		}()
	}
	if *rate > 0 {
		// Open loop: call i is due at start + i/rate whatever happened to earlier calls, so a
		// slow server shows up as latency rather than as a lower offered rate.
		interval := time.Duration(float64(time.Second) / *rate)
		for i := 0; ctx.Err() == nil; i++ {
			if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
				time.Sleep(wait)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				callCtx, cancel := context.WithTimeout(context.Background(), *callTimeout)
				defer cancel()
				call(callCtx)
			}()
		}
	} else {
		for i := 0; i < *concurrency; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					call(context.Background())
				}
			}()
		}
	}
	wg.Wait()
	seconds := time.Since(start).Seconds()
	slices.Sort(latencies)
	q := func(p float64) float64 {
		if len(latencies) == 0 {
			return 0
		}
		return float64(latencies[min(len(latencies)-1, int(p*float64(len(latencies)-1)+0.5))].Microseconds())
	}
	r := result{
		Requests: requests.Load(), Errors: failures.Load(), Seconds: seconds,
		RPS: float64(requests.Load()) / seconds, P50us: q(0.5), P90us: q(0.9), P99us: q(0.99), MaxUs: q(1),
		StartUnixNs: start.UnixNano(), Stream: held, TLS: negotiated,
	}
	if *recordPath != "" {
		if err := writeRecords(*recordPath, records); err != nil {
			log.Fatal(err)
		}
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}

// tlsCredentials offers TLS 1.3 only, with X25519 key exchange, trusting only the PEM CA
// bundle at caPath. The server's certificate must name serverName when it is not empty, else
// the authority: grpc-go refuses a tls.Config ServerName that differs from -authority, so a
// given name is checked in VerifyConnection instead (the chain is verified there in full).
func tlsCredentials(caPath, serverName string) (credentials.TransportCredentials, error) {
	pem, err := os.ReadFile(caPath)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("-tls-ca %s: no PEM certificate in it", caPath)
	}
	config := &tls.Config{
		RootCAs:          roots,
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519},
	}
	if serverName != "" {
		config.InsecureSkipVerify = true // verified below, for serverName
		config.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the server sent no certificate")
			}
			opts := x509.VerifyOptions{DNSName: serverName, Roots: roots, Intermediates: x509.NewCertPool()}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(opts)
			return err
		}
	}
	return credentials.NewTLS(config), nil
}

// describe is a connection's TLS state in one line: "TLS 1.3 TLS_AES_128_GCM_SHA256 X25519
// alpn=h2 key=ECDSA-P-256".
func describe(s tls.ConnectionState) string {
	key := "?"
	if len(s.PeerCertificates) > 0 {
		cert := s.PeerCertificates[0]
		key = cert.PublicKeyAlgorithm.String()
		if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); ok {
			key += "-" + pub.Curve.Params().Name
		}
	}
	return fmt.Sprintf("%s %s %s alpn=%s key=%s", tls.VersionName(s.Version),
		tls.CipherSuiteName(s.CipherSuite), s.CurveID, s.NegotiatedProtocol, key)
}

// hold keeps one /test.Echo/Stream call open until ctx ends, counting its messages into out.
func hold(ctx context.Context, cc *grpc.ClientConn, payload []byte, start time.Time, out *streamResult) {
	desc := &grpc.StreamDesc{StreamName: "Stream", ServerStreams: true}
	stream, err := cc.NewStream(ctx, desc, "/test.Echo/Stream")
	if err == nil {
		err = stream.SendMsg(payload)
	}
	if err == nil {
		err = stream.CloseSend()
	}
	for err == nil {
		var msg []byte
		if err = stream.RecvMsg(&msg); err == nil {
			out.Messages++
			if out.Backend == "" {
				header, _ := stream.Header()
				out.Backend = first(header, nil, "x-backend")
			}
		}
	}
	if errors.Is(err, io.EOF) {
		err = nil // the server ended the stream with OK
	}
	if ctx.Err() != nil {
		return // held to the end
	}
	st := status.Convert(err)
	out.Code, out.Message, out.EndedS = st.Code(), st.Message(), time.Since(start).Seconds()
}

// first is the first value of key in a, else in b, else "".
func first(a, b metadata.MD, key string) string {
	for _, md := range []metadata.MD{a, b} {
		if v := md.Get(key); len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

func writeRecords(path string, records []record) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	for _, r := range records {
		fmt.Fprintf(w, "%d,%d,%d,%s\n", r.start.UnixNano(), r.elapsed.Microseconds(), r.code, r.backend)
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
