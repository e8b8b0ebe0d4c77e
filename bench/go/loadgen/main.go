// Command loadgen sends unary gRPC calls (/test.Echo/Unary, raw bytes) and reports JSON:
// requests, errors, seconds, rps and latency percentiles in microseconds.
//
// Closed loop (throughput at fixed concurrency):  loadgen -targets A,B -concurrency 64 -duration 10s
// Open loop (latency at a fixed rate):            loadgen -targets A -rate 2000 -duration 10s
//
// Several targets are used round robin, one connection each (the "direct" case); -authority
// sets :authority (how the proxies route).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

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
}

func main() {
	targets := flag.String("targets", "127.0.0.1:8080", "comma-separated HOST:PORT, used round robin")
	authority := flag.String("authority", "", ":authority to send (default: the target)")
	concurrency := flag.Int("concurrency", 32, "calls in flight (closed loop)")
	rate := flag.Float64("rate", 0, "calls per second (open loop); 0 = closed loop")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	size := flag.Int("size", 64, "request payload bytes")
	conns := flag.Int("connections", 1, "connections per target")
	callTimeout := flag.Duration("call-timeout", 5*time.Second, "deadline of each open-loop call")
	flag.Parse()

	var clients []*grpc.ClientConn
	for _, t := range strings.Split(*targets, ",") {
		for i := 0; i < *conns; i++ {
			opts := []grpc.DialOption{
				grpc.WithTransportCredentials(insecure.NewCredentials()),
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
	var next, requests, errors atomic.Int64
	var mu sync.Mutex
	var latencies []time.Duration
	call := func(ctx context.Context) {
		cc := clients[int(next.Add(1))%len(clients)]
		var resp []byte
		start := time.Now()
		err := cc.Invoke(ctx, "/test.Echo/Unary", payload, &resp)
		elapsed := time.Since(start)
		requests.Add(1)
		if err != nil {
			errors.Add(1)
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
	// Warm up every connection before measuring.
	for range clients {
		call(context.Background())
	}
	requests.Store(0)
	errors.Store(0)
	latencies = latencies[:0]

	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
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
		Requests: requests.Load(), Errors: errors.Load(), Seconds: seconds,
		RPS: float64(requests.Load()) / seconds, P50us: q(0.5), P90us: q(0.9), P99us: q(0.99), MaxUs: q(1),
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}
