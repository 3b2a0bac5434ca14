// Command xds-go is a go-control-plane management server for envoyx's xDS tests.
//
// It is built the way go-control-plane's own integration driver (pkg/test/main) is:
// a snapshot cache (ADS mode for SotW), server.NewServer with ordered ADS, the
// callbacks and registration of pkg/test/v3, and resources made by
// pkg/test/resource/v3 (clusters with EDS over ADS, endpoints, route configurations)
// plus listeners whose HTTP connection manager takes its routes from RDS over ADS.
//
// Unlike pkg/test/main it sends no traffic itself and never sets a snapshot on a timer:
// the test drives it over stdin and reads what happened from stdout, one event a line:
//
//	stdin   update          set the next snapshot version (v0 is set at start-up)
//	stdin   listeners N     the next snapshots have N listeners (and routes, clusters)
//	stdin   endpoints N [P] the next snapshots give cluster 0 N endpoints, 127.x.y.z:P
//	                        (P: --upstream-port), from 127.1.0.0 on; 0: the one default
//	stdin   bad on|off      the next snapshots add an endpoint with an empty address
//	                        (which Envoy's schema rules reject) to cluster 0
//	stdin   quit (or EOF)   stop the server and exit 0
//	stdout  listening PORT                  the gRPC server is bound (--xds-port 0 picks one)
//	stdout  snapshot VERSION                that snapshot is set in the cache
//	stdout  sent TYPE_URL VERSION NONCE N R a response of N resources (and, in Delta, R
//	                                        removed_resources) went to the client
//	stdout  ack TYPE_URL VERSION NONCE      the client accepted the response NONCE
//	stdout  nack TYPE_URL VERSION NONCE MSG the client rejected it (MSG is its error_detail)
//	stdout  request TYPE_URL VERSION NONCE  a further request naming NONCE after its ACK or
//	                                        NACK: a change of subscription
//	stdout  stream open|closed ID           an ADS stream opened or closed
//
// In ack, nack and request lines VERSION is, in SotW, the request's version_info (the
// last version the client accepted; "-" when empty), and in Delta, whose requests carry
// no version, the system_version_info of the response NONCE.
//
// Snapshot vK has N listeners listener-i on 127.0.0.1:(base+i), each with an HCM whose
// RDS names route-vK-i; route-vK-i sends / to cluster-vK-i, an EDS cluster whose
// ClusterLoadAssignment has the one endpoint 127.0.0.1:upstream-port. Every update
// thus replaces every route, cluster and endpoint assignment and changes every
// listener in place: the client must warm the new clusters before the new routes can
// use them, and drop the old ones.
//
// --stable-names drops the version from the names (listener-i, route-i, cluster-i), so
// that an update changes only what differs; --clusters-only leaves listeners and routes
// out; --any-node serves the snapshots to every node, whatever its id (a fleet).
//
// Logs (and --debug traces of every request) go to stderr.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/anypb"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	rsrc "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	conf "github.com/envoyproxy/go-control-plane/pkg/server/config"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	testresource "github.com/envoyproxy/go-control-plane/pkg/test/resource/v3"
	testv3 "github.com/envoyproxy/go-control-plane/pkg/test/v3"
)

// The same gRPC server options as go-control-plane's pkg/test RunManagementServer.
const (
	grpcKeepaliveTime        = 30 * time.Second
	grpcKeepaliveTimeout     = 5 * time.Second
	grpcKeepaliveMinTime     = 30 * time.Second
	grpcMaxConcurrentStreams = 1000000
)

var (
	debug        bool
	xdsPort      uint
	upstreamPort uint
	basePort     uint
	numListeners int
	mode         string
	nodeID       string
	stableNames  bool
	clustersOnly bool
	anyNode      bool
	// what the next snapshots give cluster 0 (the stdin commands endpoints and bad)
	numEndpoints int
	endpointPort uint
	badEndpoint  bool
	resources    string
	numClusters  int
	stripALS     bool
)

func init() {
	flag.BoolVar(&debug, "debug", false, "log every request and response on stderr")
	flag.UintVar(&xdsPort, "xds-port", 18000, "xDS gRPC port on 127.0.0.1 (0: any free port)")
	flag.UintVar(&upstreamPort, "upstream-port", 18080, "port of the upstream on 127.0.0.1")
	flag.UintVar(&basePort, "base-listener-port", 9000, "port of listener-0; listener-i is on base+i")
	flag.IntVar(&numListeners, "listeners", 2, "number of listeners (and of routes, clusters, endpoints)")
	flag.StringVar(&mode, "mode", testresource.Ads, "ads (State of the World) or delta-ads (incremental)")
	flag.StringVar(&nodeID, "node-id", "test-id", "node id of the client the snapshots are for")
	flag.BoolVar(&stableNames, "stable-names", false, "names without the snapshot version")
	flag.BoolVar(&clustersOnly, "clusters-only", false, "snapshots of clusters and endpoints only")
	flag.BoolVar(&anyNode, "any-node", false, "serve the snapshots to every node")
	flag.StringVar(&resources, "resources", "rds", "rds (the listeners described above) or integration (pkg/test/main's TestSnapshot)")
	flag.IntVar(&numClusters, "clusters", 4, "integration: number of clusters")
	flag.BoolVar(&stripALS, "strip-als", false, "integration: remove the HTTP listeners' gRPC access log")
}

// sameNode maps every node to --node-id (--any-node).
type sameNode struct{}

func (sameNode) ID(*core.Node) string { return nodeID }

// out writes the event lines of stdout, one whole line per write.
var outMu sync.Mutex

func emit(format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

// logger is the cache's logger: warnings and errors always, the rest with --debug.
type logger struct{}

func (logger) Debugf(format string, args ...any) {
	if debug {
		log.Printf(format, args...)
	}
}

func (logger) Infof(format string, args ...any) {
	if debug {
		log.Printf(format, args...)
	}
}
func (logger) Warnf(format string, args ...any)  { log.Printf(format, args...) }
func (logger) Errorf(format string, args ...any) { log.Printf(format, args...) }

// callbacks wraps pkg/test/v3's Callbacks and reports ACKs and NACKs on stdout.
type callbacks struct {
	testv3.Callbacks

	mu sync.Mutex
	// Responses not yet answered by an ACK or a NACK, by stream and nonce, with their
	// version (Delta requests carry no version).
	pending map[streamNonce]string
}

type streamNonce struct {
	stream int64
	nonce  string
}

func (cb *callbacks) sent(id int64, nonce, version string) {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	cb.pending[streamNonce{id, nonce}] = version
}

// answered reports a request carrying the nonce of a response: the first one is the
// ACK or NACK of that response, later ones (same nonce) change the subscription.
func (cb *callbacks) answered(id int64, typeURL, version, nonce string, e interface{ GetMessage() string }) {
	cb.mu.Lock()
	sentVersion, first := cb.pending[streamNonce{id, nonce}]
	delete(cb.pending, streamNonce{id, nonce})
	cb.mu.Unlock()
	if version == "" {
		version = sentVersion
	}
	switch {
	case !first:
		if version == "" {
			version = "-"
		}
		emit("request %s %s %s", typeURL, version, nonce)
	case e != nil:
		emit("nack %s %s %s %s", typeURL, version, nonce, oneLine(e.GetMessage()))
	default:
		emit("ack %s %s %s", typeURL, version, nonce)
	}
}

func (cb *callbacks) OnStreamOpen(ctx context.Context, id int64, typ string) error {
	emit("stream open %d", id)
	return cb.Callbacks.OnStreamOpen(ctx, id, typ)
}

func (cb *callbacks) OnStreamClosed(id int64, node *core.Node) {
	emit("stream closed %d", id)
	cb.Callbacks.OnStreamClosed(id, node)
}

func (cb *callbacks) OnDeltaStreamOpen(ctx context.Context, id int64, typ string) error {
	emit("stream open %d", id)
	return cb.Callbacks.OnDeltaStreamOpen(ctx, id, typ)
}

func (cb *callbacks) OnDeltaStreamClosed(id int64, node *core.Node) {
	emit("stream closed %d", id)
	cb.Callbacks.OnDeltaStreamClosed(id, node)
}

func checkNode(node *core.Node) {
	if node != nil && node.GetId() != "" && node.GetId() != nodeID {
		log.Printf("request from node %q; snapshots are for node %q only", node.GetId(), nodeID)
	}
}

func (cb *callbacks) OnStreamRequest(id int64, req *discovery.DiscoveryRequest) error {
	checkNode(req.GetNode())
	if debug {
		log.Printf("stream %d request %s version=%q nonce=%q names=%v error=%v",
			id, req.GetTypeUrl(), req.GetVersionInfo(), req.GetResponseNonce(),
			req.GetResourceNames(), req.GetErrorDetail())
	}
	if nonce := req.GetResponseNonce(); nonce != "" {
		// A NACK's version_info is the last version accepted, reported as is.
		version := req.GetVersionInfo()
		if version == "" {
			version = "-"
		}
		if e := req.GetErrorDetail(); e != nil {
			cb.answered(id, req.GetTypeUrl(), version, nonce, e)
		} else {
			cb.answered(id, req.GetTypeUrl(), version, nonce, nil)
		}
	}
	return cb.Callbacks.OnStreamRequest(id, req)
}

func (cb *callbacks) OnStreamResponse(ctx context.Context, id int64, req *discovery.DiscoveryRequest, res *discovery.DiscoveryResponse) {
	cb.sent(id, res.GetNonce(), res.GetVersionInfo())
	emit("sent %s %s %s %d 0", res.GetTypeUrl(), res.GetVersionInfo(), res.GetNonce(), len(res.GetResources()))
	cb.Callbacks.OnStreamResponse(ctx, id, req, res)
}

func (cb *callbacks) OnStreamDeltaRequest(id int64, req *discovery.DeltaDiscoveryRequest) error {
	checkNode(req.GetNode())
	if debug {
		log.Printf("stream %d delta request %s nonce=%q subscribe=%v unsubscribe=%v initial=%v error=%v",
			id, req.GetTypeUrl(), req.GetResponseNonce(), req.GetResourceNamesSubscribe(),
			req.GetResourceNamesUnsubscribe(), req.GetInitialResourceVersions(), req.GetErrorDetail())
	}
	if nonce := req.GetResponseNonce(); nonce != "" {
		// The version reported is that of the response NONCE.
		if e := req.GetErrorDetail(); e != nil {
			cb.answered(id, req.GetTypeUrl(), "", nonce, e)
		} else {
			cb.answered(id, req.GetTypeUrl(), "", nonce, nil)
		}
	}
	return cb.Callbacks.OnStreamDeltaRequest(id, req)
}

func (cb *callbacks) OnStreamDeltaResponse(id int64, req *discovery.DeltaDiscoveryRequest, res *discovery.DeltaDiscoveryResponse) {
	cb.sent(id, res.GetNonce(), res.GetSystemVersionInfo())
	if debug {
		log.Printf("stream %d delta response %s version=%q nonce=%q resources=%d removed=%v",
			id, res.GetTypeUrl(), res.GetSystemVersionInfo(), res.GetNonce(),
			len(res.GetResources()), res.GetRemovedResources())
	}
	emit("sent %s %s %s %d %d", res.GetTypeUrl(), res.GetSystemVersionInfo(), res.GetNonce(),
		len(res.GetResources()), len(res.GetRemovedResources()))
	cb.Callbacks.OnStreamDeltaResponse(id, req, res)
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// makeListener is pkg/test/resource/v3's MakeRouteHTTPListener without its gRPC access
// log (which would need an als_cluster in the client's bootstrap).
func makeListener(name string, port uint32, routeName string) *listener.Listener {
	routerConfig, err := anypb.New(&router.Router{})
	if err != nil {
		panic(err)
	}
	manager := &hcm.HttpConnectionManager{
		CodecType:  hcm.HttpConnectionManager_AUTO,
		StatPrefix: name,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{
			Rds: &hcm.Rds{
				ConfigSource: &core.ConfigSource{
					ResourceApiVersion:    rsrc.DefaultAPIVersion,
					ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
				},
				RouteConfigName: routeName,
			},
		},
		HttpFilters: []*hcm.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: routerConfig},
		}},
	}
	typed, err := anypb.New(manager)
	if err != nil {
		panic(err)
	}
	return &listener.Listener{
		Name: name,
		Address: &core.Address{
			Address: &core.Address_SocketAddress{
				SocketAddress: &core.SocketAddress{
					Protocol:      core.SocketAddress_TCP,
					Address:       "127.0.0.1",
					PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
				},
			},
		},
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{{
				Name:       "envoy.filters.network.http_connection_manager",
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: typed},
			}},
		}},
	}
}

func socketAddress(address string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol:      core.SocketAddress_TCP,
		Address:       address,
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

// makeAssignment is cluster 0's ClusterLoadAssignment as the endpoints and bad
// commands left it: MakeEndpoint's one endpoint, or numEndpoints endpoints on
// 127.1.0.0, 127.1.0.1, ... (all loopback: an upstream bound to 0.0.0.0 answers each),
// plus one with an empty address when badEndpoint.
func makeAssignment(clusterName string) *endpoint.ClusterLoadAssignment {
	cla := testresource.MakeEndpoint(clusterName, uint32(upstreamPort))
	if numEndpoints == 0 && !badEndpoint {
		return cla
	}
	if numEndpoints > 0 {
		lbs := make([]*endpoint.LbEndpoint, 0, numEndpoints+1)
		for i := 0; i < numEndpoints; i++ {
			address := fmt.Sprintf("127.%d.%d.%d", 1+i>>16, (i>>8)&255, i&255)
			lbs = append(lbs, &endpoint.LbEndpoint{HostIdentifier: &endpoint.LbEndpoint_Endpoint{
				Endpoint: &endpoint.Endpoint{Address: socketAddress(address, uint32(endpointPort))},
			}})
		}
		cla.Endpoints[0].LbEndpoints = lbs
	}
	if badEndpoint {
		cla.Endpoints[0].LbEndpoints = append(cla.Endpoints[0].LbEndpoints, &endpoint.LbEndpoint{
			HostIdentifier: &endpoint.LbEndpoint_Endpoint{
				Endpoint: &endpoint.Endpoint{Address: socketAddress("", uint32(upstreamPort))},
			},
		})
	}
	return cla
}

// generateIntegration is the snapshot pkg/test/main sets for each update: its
// TestSnapshot with clusters, HTTP listeners (RDS), scoped-route HTTP listeners (SRDS,
// keyed by the Host header), TCP listeners, one runtime layer and one extension config,
// each listener on its own port from the base port up (HTTP, then scoped, then TCP).
func generateIntegration(version string) *cache.Snapshot {
	ts := testresource.TestSnapshot{
		Xds:                    mode,
		Version:                version,
		UpstreamPort:           uint32(upstreamPort),
		BasePort:               uint32(basePort),
		NumClusters:            numClusters,
		NumHTTPListeners:       numListeners,
		NumScopedHTTPListeners: numListeners,
		NumTCPListeners:        numListeners,
		NumRuntimes:            1,
		NumExtension:           1,
	}
	snapshot := ts.Generate()
	if stripALS {
		for _, res := range snapshot.GetResources(rsrc.ListenerType) {
			withoutAccessLog(res.(*listener.Listener))
		}
	}
	if err := snapshot.Consistent(); err != nil {
		log.Fatalf("snapshot %s inconsistent: %v", version, err)
	}
	return snapshot
}

// withoutAccessLog removes the access loggers of a listener's HTTP connection managers
// (the resources' envoy.access_loggers.http_grpc, for a client without it).
func withoutAccessLog(l *listener.Listener) {
	for _, chain := range l.GetFilterChains() {
		for _, f := range chain.GetFilters() {
			manager := &hcm.HttpConnectionManager{}
			if f.GetTypedConfig().MessageIs(manager) {
				if err := f.GetTypedConfig().UnmarshalTo(manager); err != nil {
					panic(err)
				}
				manager.AccessLog = nil
				typed, err := anypb.New(manager)
				if err != nil {
					panic(err)
				}
				f.ConfigType = &listener.Filter_TypedConfig{TypedConfig: typed}
			}
		}
	}
}

func generate(version string) *cache.Snapshot {
	if resources == "integration" {
		return generateIntegration(version)
	}
	var listeners, routes, clusters, endpoints []types.Resource
	tag := version + "-"
	if stableNames {
		tag = ""
	}
	for i := 0; i < numListeners; i++ {
		clusterName := fmt.Sprintf("cluster-%s%d", tag, i)
		routeName := fmt.Sprintf("route-%s%d", tag, i)
		clusters = append(clusters, testresource.MakeCluster(mode, clusterName))
		if i == 0 {
			endpoints = append(endpoints, makeAssignment(clusterName))
		} else {
			endpoints = append(endpoints, testresource.MakeEndpoint(clusterName, uint32(upstreamPort)))
		}
		if !clustersOnly {
			routes = append(routes, testresource.MakeRouteConfig(routeName, clusterName))
			listeners = append(listeners, makeListener(fmt.Sprintf("listener-%d", i), uint32(basePort)+uint32(i), routeName))
		}
	}
	snapshot, err := cache.NewSnapshot(version, map[rsrc.Type][]types.Resource{
		rsrc.EndpointType: endpoints,
		rsrc.ClusterType:  clusters,
		rsrc.RouteType:    routes,
		rsrc.ListenerType: listeners,
	})
	if err != nil {
		log.Fatalf("snapshot %s: %v", version, err)
	}
	if err := snapshot.Consistent(); err != nil {
		log.Fatalf("snapshot %s inconsistent: %v", version, err)
	}
	return snapshot
}

func main() {
	flag.Parse()
	log.SetPrefix("xds-go: ")
	if mode != testresource.Ads && mode != testresource.DeltaAds {
		log.Fatalf("--mode must be %s or %s, not %q", testresource.Ads, testresource.DeltaAds, mode)
	}
	if numListeners < 1 {
		log.Fatalf("--listeners must be at least 1")
	}
	if resources != "rds" && resources != "integration" {
		log.Fatalf("--resources must be rds or integration, not %q", resources)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// As pkg/test/main: the cache holds responses until every resource is named only
	// in SotW ADS mode, and SotW ADS responses are ordered.
	var hash cache.NodeHash = cache.IDHash{}
	if anyNode {
		hash = sameNode{}
	}
	snapshots := cache.NewSnapshotCache(mode == testresource.Ads, hash, logger{})
	var opts []conf.XDSOption
	if mode == testresource.Ads {
		opts = append(opts, sotw.WithOrderedADS())
	}
	cb := &callbacks{Callbacks: testv3.Callbacks{Debug: debug}, pending: map[streamNonce]string{}}
	srv := server.NewServer(ctx, snapshots, cb, opts...)

	grpcServer := grpc.NewServer(
		grpc.MaxConcurrentStreams(grpcMaxConcurrentStreams),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    grpcKeepaliveTime,
			Timeout: grpcKeepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             grpcKeepaliveMinTime,
			PermitWithoutStream: true,
		}),
	)
	testv3.RegisterServer(grpcServer, srv)

	lis, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", xdsPort))
	if err != nil {
		log.Fatal(err)
	}

	version := 0
	setSnapshot := func() {
		v := fmt.Sprintf("v%d", version)
		if err := snapshots.SetSnapshot(ctx, nodeID, generate(v)); err != nil {
			log.Fatalf("set snapshot %s: %v", v, err)
		}
		emit("snapshot %s", v)
	}
	setSnapshot()

	served := make(chan error, 1)
	go func() { served <- grpcServer.Serve(lis) }()
	emit("listening %d", lis.Addr().(*net.TCPAddr).Port)

	commands := make(chan string)
	go func() {
		scanner := bufio.NewScanner(os.Stdin)
		for scanner.Scan() {
			commands <- strings.TrimSpace(scanner.Text())
		}
		close(commands)
	}()

	for {
		select {
		case err := <-served:
			log.Fatalf("gRPC server stopped: %v", err)
		case cmd, ok := <-commands:
			switch {
			case !ok || cmd == "quit":
				cancel()
				grpcServer.Stop()
				return
			case cmd == "update":
				version++
				setSnapshot()
			case strings.HasPrefix(cmd, "listeners "):
				n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(cmd, "listeners ")))
				if err != nil || n < 1 {
					log.Fatalf("bad command %q: want listeners N, N >= 1", cmd)
				}
				numListeners = n
			case strings.HasPrefix(cmd, "endpoints "):
				fields := strings.Fields(strings.TrimPrefix(cmd, "endpoints "))
				n, err := strconv.Atoi(fields[0])
				port := upstreamPort
				if err == nil && len(fields) > 1 {
					var p uint64
					p, err = strconv.ParseUint(fields[1], 10, 16)
					port = uint(p)
				}
				if err != nil || n < 0 || n > 1<<20 {
					log.Fatalf("bad command %q: want endpoints N [PORT]", cmd)
				}
				numEndpoints, endpointPort = n, port
			case cmd == "bad on" || cmd == "bad off":
				badEndpoint = cmd == "bad on"
			case cmd == "":
			default:
				log.Fatalf("unknown command %q (known: update, listeners N, endpoints N [PORT], bad on|off, quit)", cmd)
			}
		}
	}
}
