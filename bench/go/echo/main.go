// Command echo is the benchmark backend: a grpc-go server that answers every unary call on
// /test.Echo/Unary with the request bytes and header x-backend: NAME. It is far faster than
// any of the proxies measured, so the proxy is what the benchmark measures.
//
//	echo -listen 127.0.0.1:50051 -name a
package main

import (
	"flag"
	"log"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"weighbridge.local/bench/rawcodec"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "address to listen on")
	name := flag.String("name", "echo", "value of the x-backend response header")
	flag.Parse()
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	header := metadata.Pairs("x-backend", *name)
	srv := grpc.NewServer(
		grpc.ForceServerCodec(rawcodec.Codec{}),
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			var req []byte
			if err := stream.RecvMsg(&req); err != nil {
				return err
			}
			if err := stream.SetHeader(header); err != nil {
				return err
			}
			return stream.SendMsg(req)
		}),
	)
	log.Printf("echo %s listening on %s", *name, lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
