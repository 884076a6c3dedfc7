// clientgo-elector: the anchor for bench/run.py and the mixed-fleet chaos test. One replica of
// client-go's own leader election (tools/leaderelection with a LeaseLock, ReleaseOnCancel on),
// with the timings given by flags, printing every transition as one JSON line on stdout:
//
//	{"event":"started_leading","identity":"a","mono":12345.678901}
//
// "mono" is CLOCK_MONOTONIC in seconds, the clock Python's time.monotonic() reads, so a test
// on the same machine can compare it with its own times. Events: "ready" (client built),
// "new_leader" (with "leader"; also the first observation), "started_leading", "stopping"
// (SIGTERM/SIGINT received: as client-go requires with ReleaseOnCancel, the guarded work ends
// here, before the Lease is released), "stopped_leading", "exit".
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

var out sync.Mutex

func mono() float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err)
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func emit(event string, fields map[string]any) {
	line := map[string]any{"event": event, "mono": mono()}
	for k, v := range fields {
		line[k] = v
	}
	data, _ := json.Marshal(line)
	out.Lock()
	defer out.Unlock()
	os.Stdout.Write(append(data, '\n'))
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file")
	namespace := flag.String("namespace", "default", "namespace of the Lease")
	name := flag.String("lease-name", "clientgo-bench", "Lease name")
	id := flag.String("id", "", "this replica's identity")
	lease := flag.Duration("lease-duration", 15*time.Second, "lease duration")
	renew := flag.Duration("renew-deadline", 10*time.Second, "renew deadline")
	retry := flag.Duration("retry-period", 2*time.Second, "retry period")
	qps := flag.Float64("qps", 50, "client QPS limit")
	flag.Parse()
	klog.InitFlags(nil)
	_ = flag.Set("v", "0")
	if *id == "" {
		fmt.Fprintln(os.Stderr, "--id is required")
		os.Exit(2)
	}

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	config.QPS = float32(*qps)
	config.Burst = int(*qps * 2)
	config.UserAgent = "clientgo-elector/" + *id
	client := kubernetes.NewForConfigOrDie(config)

	ctx, cancel := context.WithCancel(context.Background())
	var leading sync.Mutex
	isLeader := false
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		leading.Lock()
		emit("stopping", map[string]any{"identity": *id, "was_leader": isLeader})
		leading.Unlock()
		cancel()
	}()

	emit("ready", map[string]any{"identity": *id})
	leaderelection.RunOrDie(ctx, leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Name: *name, Namespace: *namespace},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: *id},
		},
		ReleaseOnCancel: true,
		LeaseDuration:   *lease,
		RenewDeadline:   *renew,
		RetryPeriod:     *retry,
		Name:            *name,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) {
				leading.Lock()
				isLeader = true
				leading.Unlock()
				emit("started_leading", map[string]any{"identity": *id})
			},
			OnStoppedLeading: func() {
				leading.Lock()
				isLeader = false
				leading.Unlock()
				emit("stopped_leading", map[string]any{"identity": *id})
			},
			OnNewLeader: func(identity string) {
				emit("new_leader", map[string]any{"identity": *id, "leader": identity})
			},
		},
	})
	emit("exit", map[string]any{"identity": *id})
}
