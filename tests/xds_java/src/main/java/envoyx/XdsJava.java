package envoyx;

import static io.envoyproxy.envoy.config.core.v3.ApiVersion.V3;

import io.envoyproxy.controlplane.cache.TestResources;
import io.envoyproxy.controlplane.cache.v3.SimpleCache;
import io.envoyproxy.controlplane.cache.v3.Snapshot;
import io.envoyproxy.controlplane.server.DiscoveryServerCallbacks;
import io.envoyproxy.controlplane.server.V3DiscoveryServer;
import io.envoyproxy.envoy.service.discovery.v3.DeltaDiscoveryRequest;
import io.envoyproxy.envoy.service.discovery.v3.DiscoveryRequest;
import io.grpc.Server;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.List;

/**
 * java-control-plane's own cache, server and TestResources, as its integration tests drive
 * Envoy: one EDS cluster, its endpoint, an RDS listener and its route, all over ADS.
 *
 * <p>Usage: {@code XdsJava <listener-port> <endpoint-port> <sotw|delta>}. Commands on stdin:
 * {@code snapshot <version> <endpoint-port>} sets a new snapshot, {@code quit} stops. Events on
 * stdout, one per line: {@code listening <port>}, {@code snapshot <version>}, {@code ack <type>
 * <version> <nonce>}, {@code nack <type> <version> <nonce> <message>}.
 */
public final class XdsJava {
  private static final String GROUP = "key";

  private XdsJava() {}

  private static synchronized void event(String line) {
    System.out.println(line);
    System.out.flush();
  }

  private static Snapshot snapshot(boolean delta, int listenerPort, int endpointPort, String version) {
    return Snapshot.create(
        List.of(TestResources.createCluster("upstream")),
        List.of(TestResources.createEndpoint("upstream", "127.0.0.1", endpointPort)),
        List.of(TestResources.createListener(true, delta, V3, V3, "listener0", listenerPort, "route0")),
        List.of(TestResources.createRoute("route0", "upstream")),
        List.of(),
        version);
  }

  public static void main(String[] args) throws Exception {
    int listenerPort = Integer.parseInt(args[0]);
    int endpointPort = Integer.parseInt(args[1]);
    boolean delta = args[2].equals("delta");

    SimpleCache<String> cache = new SimpleCache<>(node -> GROUP);
    cache.setSnapshot(GROUP, snapshot(delta, listenerPort, endpointPort, "1"));

    DiscoveryServerCallbacks callbacks =
        new DiscoveryServerCallbacks() {
          @Override
          public void onV3StreamRequest(long streamId, DiscoveryRequest request) {
            if (request.getResponseNonce().isEmpty()) {
              return;
            }
            String common =
                request.getTypeUrl() + " " + request.getVersionInfo() + " " + request.getResponseNonce();
            if (request.hasErrorDetail()) {
              event("nack " + common + " " + request.getErrorDetail().getMessage().replace('\n', ' '));
            } else {
              event("ack " + common);
            }
          }

          @Override
          public void onV3StreamDeltaRequest(long streamId, DeltaDiscoveryRequest request) {
            if (request.getResponseNonce().isEmpty()) {
              return;
            }
            String common = request.getTypeUrl() + " - " + request.getResponseNonce();
            if (request.hasErrorDetail()) {
              event("nack " + common + " " + request.getErrorDetail().getMessage().replace('\n', ' '));
            } else {
              event("ack " + common);
            }
          }
        };

    V3DiscoveryServer server = new V3DiscoveryServer(callbacks, cache);
    Server grpc =
        NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
            .addService(server.getAggregatedDiscoveryServiceImpl())
            .build()
            .start();
    event("listening " + grpc.getPort());

    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    for (String line = in.readLine(); line != null; line = in.readLine()) {
      String[] words = line.trim().split("\\s+");
      if (words[0].equals("snapshot")) {
        cache.setSnapshot(GROUP, snapshot(delta, listenerPort, Integer.parseInt(words[2]), words[1]));
        event("snapshot " + words[1]);
      } else if (words[0].equals("quit")) {
        break;
      }
    }
    grpc.shutdownNow();
  }
}
