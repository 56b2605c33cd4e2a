// Command kstatus prints what the kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus,
// the code kubectl wait, Flux and cli-utils appliers use) computes for Kubernetes objects.
//
// It reads a JSON array of objects on stdin and writes a JSON array of
// {"status": ..., "message": ...} in the same order, so tests can assert what Argo CD
// and Flux will show for real objects read from the API server.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	// apimachinery's JSON decoding keeps integers int64, as the API machinery expects.
	data, err := io.ReadAll(os.Stdin)
	var objects []interface{}
	if err == nil {
		err = utiljson.Unmarshal(data, &objects)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: reading a JSON array of objects: %v\n", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(objects))
	for i, item := range objects {
		object, ok := item.(map[string]interface{})
		if !ok {
			fmt.Fprintf(os.Stderr, "kstatus: item %d is not an object\n", i)
			os.Exit(2)
		}
		computed, err := status.Compute(&unstructured.Unstructured{Object: object})
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
			os.Exit(1)
		}
		results = append(results, result{Status: computed.Status.String(), Message: computed.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
}
