//go:build tools

// Package tools records the weed command package build.sh compiles, so that
// `go mod tidy` keeps every module it needs in go.mod and go.sum.
package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
