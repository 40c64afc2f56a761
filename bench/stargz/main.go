// Command containerd-stargz-grpc (bench build): stargz-snapshotter 0.12's snapshotter
// daemon, for bench/lazy.sh only.
//
// Upstream's cmd/containerd-stargz-grpc/main.go also wires the Kubernetes and CRI keychains,
// which need k8s.io packages Debian does not have. This main keeps what a pull from a local
// plain-HTTP registry uses, as upstream does it with no config file: the default
// service.Config (prefetch and background fetch on), the in-memory metadata store, the
// default resolver (plain HTTP for localhost and 127.0.0.1), no credentials; the snapshotter
// served over gRPC on a Unix socket. SIGINT or SIGTERM stops the server and closes the
// snapshotter (it unmounts its FUSE layers), as upstream does on SIGINT.
//
// Built by bench/lazy.sh with Debian's Go 1.19 in GOPATH mode from Debian's Go packages
// (golang-github-containerd-stargz-snapshotter-dev 0.12.0 and what it depends on), offline:
//
//	GO111MODULE=off GOPATH=OVERLAY:/usr/share/gocode go build -o containerd-stargz-grpc ./bench/stargz
//
// where OVERLAY holds Debian's package service and service/resolver without cri.go, which
// imports k8s.io/cri-api (not in Debian) for the CRI mirror config this main does not use.
package main

import (
	"context"
	"flag"
	golog "log"
	"net"
	"os"
	"os/signal"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/fs"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "Unix socket for the snapshotter's gRPC server")
	root := flag.String("root", "", "the snapshotter's root directory")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error")
	noBackground := flag.Bool("no-background-fetch", false, "turn the background fetch off")
	flag.Parse()
	if *address == "" || *root == "" {
		golog.Fatal("containerd-stargz-grpc: --address and --root are required")
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		golog.Fatalf("containerd-stargz-grpc: --log-level: %v", err)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)
	// go-fuse logs through the standard logger: into the debug level, as upstream
	golog.SetOutput(log.G(ctx).WriterLevel(logrus.DebugLevel))

	if err := service.Supported(*root); err != nil {
		log.G(ctx).WithError(err).Fatal("snapshotter is not supported")
	}
	var cfg service.Config
	cfg.Config.NoBackgroundFetch = *noBackground
	rs, err := service.NewStargzSnapshotterService(ctx, *root, &cfg,
		service.WithFilesystemOptions(
			fs.WithMetricsLogLevel(logrus.InfoLevel),
			fs.WithMetadataStore(memorymetadata.NewReader)))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("failed to configure the snapshotter")
	}

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("socket directory")
	}
	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatal("old socket")
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("listen on %q", *address)
	}
	errCh := make(chan error, 1)
	go func() { errCh <- rpc.Serve(l) }()

	sigCh := make(chan os.Signal, 1)
	signal.Notify(sigCh, unix.SIGINT, unix.SIGTERM)
	select {
	case s := <-sigCh:
		log.G(ctx).Infof("got %v: closing the snapshotter", s)
	case err := <-errCh:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	rpc.Stop()
	if err := rs.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing the snapshotter")
	}
	log.G(ctx).Info("exiting")
}
