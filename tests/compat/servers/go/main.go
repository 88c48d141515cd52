// Go net/http recipe (docs/servers.md), standard library only.
package main

import (
	"context"
	"encoding/json"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// notify sends one sd_notify message to $NOTIFY_SOCKET (a no-op when it is unset).
func notify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		log.Printf("sd_notify: %v", err)
		return
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		log.Printf("sd_notify: %v", err)
	}
}

func main() {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) || os.Getenv("LISTEN_FDS") == "" {
		log.Fatal("no socket at fd 3 (LISTEN_PID/LISTEN_FDS): run me under herdsman or systemd socket activation")
	}
	// The inherited socket at fd 3. FileListener dups it; close the original.
	f := os.NewFile(3, os.Getenv("LISTEN_FDNAMES"))
	ln, err := net.FileListener(f)
	if err != nil {
		log.Fatalf("fd 3 is not a listening socket: %v", err)
	}
	f.Close()

	id, _ := strconv.Atoi(os.Getenv("HERDSMAN_WORKER_ID"))
	gen, _ := strconv.Atoi(os.Getenv("HERDSMAN_GENERATION"))
	body, _ := json.Marshal(map[string]any{"server": "go", "pid": os.Getpid(), "worker_id": id, "generation": gen})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	// Drain on SIGTERM: Shutdown closes the listener, then waits for in-flight requests.
	drained := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Printf("shutdown: %v", err)
		}
		close(drained)
	}()

	if dir := os.Getenv("COMPAT_MARK_DIR"); dir != "" { // suite only
		os.WriteFile(filepath.Join(dir, "loaded-"+strconv.Itoa(gen)+"-"+strconv.Itoa(id)), nil, 0o644)
	}
	notify("READY=1")
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	// Serve returns as soon as Shutdown starts: exiting now would cut in-flight requests.
	<-drained
}
