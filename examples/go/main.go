// Watch who leads, through the leader-sidecar next to this app; print one line per change.
//
//	go run . [-shards] [ADDRESS]    (default $LEADER_SIDECAR_GRPC, else 127.0.0.1:4041;
//	                                 unix:/path works too)
//
// With -shards (a sidecar run with `--shards N`): print the shards this replica owns instead.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "leadersidecar-example/leadersidecarv1"
)

func main() {
	address := os.Getenv("LEADER_SIDECAR_GRPC")
	shards := false
	for _, arg := range os.Args[1:] {
		if arg == "-shards" || arg == "--shards" {
			shards = true
		} else {
			address = arg
		}
	}
	if address == "" {
		address = "127.0.0.1:4041"
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// Loopback only, inside the pod: no TLS.
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("bad address %q: %v", address, err)
	}
	defer conn.Close()
	client := pb.NewLeaderElectionClient(conn)
	if shards {
		watchShards(ctx, pb.NewShardsClient(conn))
		return
	}

	for ctx.Err() == nil {
		// WaitForReady: while the sidecar starts, wait for it instead of failing at once.
		stream, err := client.Watch(ctx, &pb.WatchRequest{}, grpc.WaitForReady(true))
		for err == nil {
			var state *pb.Leadership
			if state, err = stream.Recv(); err == nil {
				show(state)
			}
		}
		if ctx.Err() == nil {
			// The stream broke (sidecar restarting): until it is back, do not act as leader.
			log.Printf("watch ended: %v; reconnecting", err)
			time.Sleep(time.Second)
		}
	}
}

// Act as leader only while the newest message says is_leader, and at most valid_for_ms after
// it arrived (the leader's stream refreshes it after every renewal, and says "not leader" when
// it runs out): an app would arm a timer with it here.
var lastLine string
var deadline time.Time

func show(s *pb.Leadership) {
	deadline = time.Time{}
	if s.ValidForMs != nil {
		deadline = time.Now().Add(time.Duration(s.GetValidForMs()) * time.Millisecond)
	}
	token := "-"
	if s.FencingToken != nil {
		token = fmt.Sprint(s.GetFencingToken())
	}
	leader := s.GetLeader()
	if leader == "" {
		leader = "-"
	}
	line := fmt.Sprintf("state=%s leader=%s is_leader=%t fencing_token=%s revision=%d",
		strings.TrimPrefix(s.GetState().String(), "STATE_"), leader, s.GetIsLeader(), token,
		s.GetRevision())
	if line != lastLine { // one line per change, not per refreshed valid_until
		fmt.Println(line)
		lastLine = line
	}
}

// Act on a shard only while the newest message lists it, and at most its valid_for_ms after the
// message arrived.
func watchShards(ctx context.Context, client pb.ShardsClient) {
	for ctx.Err() == nil {
		stream, err := client.Watch(ctx, &pb.WatchShardsRequest{}, grpc.WaitForReady(true))
		for err == nil {
			var set *pb.ShardSet
			if set, err = stream.Recv(); err == nil {
				owned := []string{}
				for _, o := range set.GetOwned() {
					owned = append(owned, fmt.Sprintf("%d@%d", o.GetShard(), o.GetFencingToken()))
				}
				line := fmt.Sprintf("owned=[%s] members=%s revision=%d",
					strings.Join(owned, " "), strings.Join(set.GetMembers(), ","), set.GetRevision())
				if line != lastLine {
					fmt.Println(line)
					lastLine = line
				}
			}
		}
		if ctx.Err() == nil {
			log.Printf("watch ended: %v; reconnecting", err)
			time.Sleep(time.Second)
		}
	}
}
