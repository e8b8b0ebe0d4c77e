// Package rawcodec is a gRPC codec for raw bytes: messages are []byte, nothing is parsed, so
// the benchmark backend and load generator spend no time on serialization. Protobuf messages
// (the standard health service beside the echo) are marshalled as protobuf.
package rawcodec

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

// Codec marshals *[]byte and []byte as they are, and proto.Message as protobuf.
type Codec struct{}

func (Codec) Marshal(v any) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	case proto.Message:
		return proto.Marshal(b)
	}
	return nil, fmt.Errorf("rawcodec: cannot marshal %T", v)
}

func (Codec) Unmarshal(data []byte, v any) error {
	switch b := v.(type) {
	case *[]byte:
		*b = append((*b)[:0], data...)
		return nil
	case proto.Message:
		return proto.Unmarshal(data, b)
	}
	return fmt.Errorf("rawcodec: cannot unmarshal into %T", v)
}

// Name is "proto" so that peers see the usual content-type (application/grpc+proto).
func (Codec) Name() string { return "proto" }
