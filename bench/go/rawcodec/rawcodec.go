// Package rawcodec is a gRPC codec for raw bytes: messages are []byte, nothing is parsed, so
// the benchmark backend and load generator spend no time on serialization.
package rawcodec

import "fmt"

// Codec marshals *[]byte and []byte as they are.
type Codec struct{}

func (Codec) Marshal(v any) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	}
	return nil, fmt.Errorf("rawcodec: cannot marshal %T", v)
}

func (Codec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawcodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// Name is "proto" so that peers see the usual content-type (application/grpc+proto).
func (Codec) Name() string { return "proto" }
