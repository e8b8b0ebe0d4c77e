// Command echo is the benchmark backend: a grpc-go server that answers every unary call on
// /test.Echo/Unary with the request bytes and header x-backend: NAME. It is far faster than
// any of the proxies measured, so the proxy is what the benchmark measures.
//
//	echo -listen 127.0.0.1:50051 -name a [-max-streams N] [-delay D [-workers N]]
//	     [-max-connection-age D [-max-connection-age-grace D]] [-fail-unavailable]
//	     [-stream-interval D] [-stop-timeout D]
//
// -max-streams advertises an HTTP/2 stream limit per connection (as Go's net/http2 does, 250,
// and nginx, 128); -delay makes each call take that long, like a backend doing work.
// -workers N lets at most N calls do their -delay at once, the others waiting in line for a
// free worker, like a server with N worker threads: its capacity is N / delay calls per
// second, and a backend with half the workers has half the capacity (bench/strategies.py).
//
// For the fault benchmark (bench/faults.py):
//   - -max-connection-age sends GOAWAY to each connection after that long (±10%, grpc-go's
//     keepalive.ServerParameters), then waits -max-connection-age-grace for its calls to end;
//   - -fail-unavailable answers every call UNAVAILABLE (x-backend in the trailers); SIGUSR1
//     toggles it, so a benchmark can make a running backend fail;
//   - /test.Echo/Stream is a server-streaming method: it answers the request with one
//     message every -stream-interval until the client cancels or the server stops;
//   - grpc.health.v1.Health answers SERVING for "" and "test.Echo" (also while failing: the
//     process is up, its calls fail, as with a broken dependency), NOT_SERVING once stopping;
//   - SIGTERM or SIGINT stops gracefully (GOAWAY, calls in flight finish), bounded by
//     -stop-timeout, after which the remaining calls are cut.
package main

import (
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"weighbridge.local/bench/rawcodec"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "address to listen on")
	name := flag.String("name", "echo", "value of the x-backend response header")
	maxStreams := flag.Uint("max-streams", 0, "HTTP/2 concurrent streams per connection; 0: no limit")
	delay := flag.Duration("delay", 0, "time each call takes before it answers")
	workers := flag.Int("workers", 0, "calls doing their -delay at once, the others wait in line; 0: no limit")
	maxAge := flag.Duration("max-connection-age", 0, "GOAWAY each connection after this long (±10%); 0: never")
	maxAgeGrace := flag.Duration("max-connection-age-grace", 0, "time calls may take to end after a max-age GOAWAY; 0: forever")
	failUnavailable := flag.Bool("fail-unavailable", false, "answer every call UNAVAILABLE (SIGUSR1 toggles)")
	streamInterval := flag.Duration("stream-interval", 100*time.Millisecond, "time between messages of /test.Echo/Stream")
	stopTimeout := flag.Duration("stop-timeout", 10*time.Second, "bound of a graceful stop on SIGTERM")
	flag.Parse()
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	var failing atomic.Bool
	failing.Store(*failUnavailable)
	header := metadata.Pairs("x-backend", *name)
	var pool chan struct{} // a free worker is a free slot
	if *workers > 0 {
		pool = make(chan struct{}, *workers)
	}
	opts := []grpc.ServerOption{grpc.ForceServerCodec(rawcodec.Codec{})}
	if *maxStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(*maxStreams)))
	}
	if *maxAge > 0 {
		opts = append(opts, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge: *maxAge, MaxConnectionAgeGrace: *maxAgeGrace,
		}))
	}
	srv := grpc.NewServer(append(opts,
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			var req []byte
			if err := stream.RecvMsg(&req); err != nil {
				return err
			}
			if failing.Load() {
				// In the trailers, so the error stays a Trailers-Only response as grpc-go sends it.
				stream.SetTrailer(header)
				return status.Errorf(codes.Unavailable, "echo %s: failing (-fail-unavailable)", *name)
			}
			if *delay > 0 {
				if pool != nil {
					// Waits for a worker (blocked senders go in arrival order) or the call's end.
					select {
					case pool <- struct{}{}:
					case <-stream.Context().Done():
						return status.FromContextError(stream.Context().Err()).Err()
					}
				}
				time.Sleep(*delay)
				if pool != nil {
					<-pool
				}
			}
			if err := stream.SetHeader(header); err != nil {
				return err
			}
			if method, _ := grpc.MethodFromServerStream(stream); method == "/test.Echo/Stream" {
				return streamUntilDone(stream, req, *streamInterval)
			}
			return stream.SendMsg(req)
		}),
	)...)
	hs := health.NewServer()
	hs.SetServingStatus("test.Echo", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)

	stopped := make(chan struct{})
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	go func() {
		defer close(stopped)
		for s := range signals {
			if s == syscall.SIGUSR1 {
				log.Printf("echo %s: failing=%v", *name, !failing.Load())
				failing.Store(!failing.Load())
				continue
			}
			log.Printf("echo %s: %v, stopping gracefully (at most %v)", *name, s, *stopTimeout)
			hs.Shutdown()
			cut := time.AfterFunc(*stopTimeout, srv.Stop)
			srv.GracefulStop()
			cut.Stop()
			return
		}
	}()
	log.Printf("echo %s listening on %s", *name, lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
	// Serve returns as soon as a stop begins; the calls in flight end before the process does.
	<-stopped
}

// streamUntilDone sends req every interval until the call ends (client cancel, server stop).
func streamUntilDone(stream grpc.ServerStream, req []byte, interval time.Duration) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		if err := stream.SendMsg(req); err != nil {
			return err
		}
		select {
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case <-tick.C:
		}
	}
}
