// A Go server that binds its own port, unchanged under herdsman (a static binary:
// CGO_ENABLED=0; LD_PRELOAD could not reach it, the seccomp filter does): ListenAndServe(":PORT").
// It drains on SIGTERM (http.Server.Shutdown).
package main

import (
	"context"
	"encoding/json"
	"log"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

func main() {
	port := os.Getenv("PORT")
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	id, _ := strconv.Atoi(os.Getenv("HERDSMAN_WORKER_ID"))
	gen, _ := strconv.Atoi(os.Getenv("HERDSMAN_GENERATION"))
	body, _ := json.Marshal(map[string]any{"server": "go-bind", "pid": os.Getpid(), "worker_id": id, "generation": gen})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	srv := &http.Server{Addr: ":" + port, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

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
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	<-drained
}
