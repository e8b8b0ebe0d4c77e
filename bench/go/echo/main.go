// Command echo is the benchmark backend: a grpc-go server that answers every unary call on
// /test.Echo/Unary with the request bytes and header x-backend: NAME. It is far faster than
// any of the proxies measured, so the proxy is what the benchmark measures.
//
//	echo -listen 127.0.0.1:50051 -name a [-max-streams N] [-delay D]
//
// -max-streams advertises an HTTP/2 stream limit per connection (as Go's net/http2 does, 250,
// and nginx, 128); -delay makes each call take that long, like a backend doing work.
package main

import (
	"flag"
	"log"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"weighbridge.local/bench/rawcodec"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "address to listen on")
	name := flag.String("name", "echo", "value of the x-backend response header")
	maxStreams := flag.Uint("max-streams", 0, "HTTP/2 concurrent streams per connection; 0: no limit")
	delay := flag.Duration("delay", 0, "time each call takes before it answers")
	flag.Parse()
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	header := metadata.Pairs("x-backend", *name)
	opts := []grpc.ServerOption{grpc.ForceServerCodec(rawcodec.Codec{})}
	if *maxStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(*maxStreams)))
	}
	srv := grpc.NewServer(append(opts,
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			var req []byte
			if err := stream.RecvMsg(&req); err != nil {
				return err
			}
			if *delay > 0 {
				time.Sleep(*delay)
			}
			if err := stream.SetHeader(header); err != nil {
				return err
			}
			return stream.SendMsg(req)
		}),
	)...)
	log.Printf("echo %s listening on %s", *name, lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
