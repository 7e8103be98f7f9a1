// A streaming client as every Go program has one: net/http's default transport asks for gzip on
// its own and decodes it with compress/flate. Prints each SSE data line the moment it decodes it.
//
//	go run stream.go URL BODY
package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"strings"
)

func main() {
	response, err := http.Post(os.Args[1], "application/json", strings.NewReader(os.Args[2]))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer response.Body.Close()
	if !response.Uncompressed {
		fmt.Fprintln(os.Stderr, "the response was not gzip: nothing of Go's decoder was tested")
		os.Exit(2)
	}
	reader := bufio.NewReader(response.Body)
	for {
		line, err := reader.ReadString('\n')
		if strings.HasPrefix(line, "data: ") {
			os.Stdout.WriteString(line) // unbuffered: one write per line
		}
		if err != nil {
			return
		}
	}
}
