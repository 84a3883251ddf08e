// MetricsEndpoint: a real scrape over HTTP on loopback, and the errors it must report rather
// than throw.
#include "core/metrics/metrics_endpoint.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <prometheus/registry.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include "core/metrics/host_metrics.h"
#include "core/metrics/metrics_test_util.h"

#if defined(__SANITIZE_THREAD__)
// Debian's civetweb formats its Date header with gmtime(), which shares one static buffer
// between threads: two workers answering at once (a scrape while a stalled request is dropped,
// as the tests below arrange) race there. That race is civetweb's (built without
// REENTRANT_TIME), not ours: only races inside gmtime are suppressed.
extern "C" const char* __tsan_default_suppressions() { return "race:gmtime\n"; }
#endif

namespace memsnap::metrics {
namespace {

// GET `path` from 127.0.0.1:port with a plain socket; the whole response, headers included.
std::string http_get(std::uint16_t port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {};
  timeval tv{5, 0};  // a hung server fails the test instead of hanging it
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
    const std::string request =
        "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
        static_cast<ssize_t>(request.size())) {
      char buf[8192];
      ssize_t n = 0;
      while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) response.append(buf, std::size_t(n));
    }
  }
  ::close(fd);
  return response;
}

// Connects to 127.0.0.1:port and sends the start of a request that never ends, as a stalled
// or hostile client would; the caller closes the returned fd (-1 on failure).
int half_sent_request(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  static constexpr char kPartial[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0 ||
      ::send(fd, kPartial, sizeof kPartial - 1, MSG_NOSIGNAL) != sizeof kPartial - 1) {
    ::close(fd);
    return -1;
  }
  return fd;
}

EndpointOptions any_port() {
  EndpointOptions o;
  o.address = "127.0.0.1";
  o.port = 0;
  return o;
}

TEST(MetricsEndpointTest, ServesTheRegistryOnLoopback) {
  HostMetricsOptions mo;
  mo.strategies = {"memfd", "process_vm_readv"};
  HostMetrics m(mo);
  PauseObservation p;
  p.strategy = "memfd";
  p.seconds = 0.02;
  m.record_pause(p);

  std::string error;
  auto endpoint = MetricsEndpoint::start(m, any_port(), &error);
  ASSERT_NE(endpoint, nullptr) << error;
  ASSERT_NE(endpoint->port(), 0);
  EXPECT_EQ(endpoint->url(), "http://127.0.0.1:" + std::to_string(endpoint->port()) + "/metrics");

  const std::string response = http_get(endpoint->port(), "/metrics");
  ASSERT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response.substr(0, 200);
  const auto body_at = response.find("\r\n\r\n");
  ASSERT_NE(body_at, std::string::npos);
  const auto e = testing::parse_exposition(response.substr(body_at + 4));
  // Every family that has a series is served, with its values.
  for (const auto& f : m.registry()->Collect()) {
    EXPECT_TRUE(e.type.count(f.name)) << f.name;
  }
  EXPECT_TRUE(e.type.count("memsnap_pause_duration_seconds"));
  EXPECT_TRUE(e.type.count("memsnap_build_info"));
  EXPECT_EQ(
      e.value("memsnap_pause_duration_seconds_count", {{"strategy", "memfd"}, {"outcome", "ok"}}),
      1);
  EXPECT_EQ(e.value("memsnap_pause_duration_seconds_count",
                    {{"strategy", "process_vm_readv"}, {"outcome", "ok"}}),
            0);

  // A later recording shows in the next scrape.
  m.record_pause(p);
  const auto again = testing::parse_exposition(http_get(endpoint->port(), "/metrics"));
  EXPECT_EQ(again.value("memsnap_pause_duration_seconds_count",
                        {{"strategy", "memfd"}, {"outcome", "ok"}}),
            2);

  EXPECT_EQ(http_get(endpoint->port(), "/elsewhere").rfind("HTTP/1.1 404", 0), 0u);
}

TEST(MetricsEndpointTest, CustomPath) {
  HostMetrics m;
  EndpointOptions o = any_port();
  o.path = "/internal/metrics";
  std::string error;
  auto endpoint = MetricsEndpoint::start(m, o, &error);
  ASSERT_NE(endpoint, nullptr) << error;
  EXPECT_NE(http_get(endpoint->port(), "/internal/metrics").find("memsnap_build_info"),
            std::string::npos);
}

TEST(MetricsEndpointTest, PortInUseIsAnErrorNotAnException) {
  HostMetrics m;
  std::string error;
  auto first = MetricsEndpoint::start(m, any_port(), &error);
  ASSERT_NE(first, nullptr) << error;
  EndpointOptions o = any_port();
  o.port = first->port();
  auto second = MetricsEndpoint::start(m, o, &error);
  EXPECT_EQ(second, nullptr);
  EXPECT_NE(error.find("cannot listen on 127.0.0.1:" + std::to_string(o.port)), std::string::npos)
      << error;
}

TEST(MetricsEndpointTest, BadOptionsAreErrors) {
  HostMetrics m;
  std::string error;
  EndpointOptions o = any_port();
  o.address = "127.0.0.1,0.0.0.0";  // would make civetweb listen twice
  EXPECT_EQ(MetricsEndpoint::start(m, o, &error), nullptr);
  EXPECT_NE(error.find("bad address"), std::string::npos) << error;

  o = any_port();
  o.path = "metrics";
  EXPECT_EQ(MetricsEndpoint::start(m, o, &error), nullptr);
  EXPECT_NE(error.find("path"), std::string::npos) << error;

  o = any_port();
  o.address = "";
  EXPECT_EQ(MetricsEndpoint::start(m, o, &error), nullptr);

  // 192.0.2.0/24 is TEST-NET-1: never an address of this host, so bind() fails locally
  // (EADDRNOTAVAIL) without a packet leaving the machine.
  o = any_port();
  o.address = "192.0.2.1";
  EXPECT_EQ(MetricsEndpoint::start(m, o, &error), nullptr);
  EXPECT_NE(error.find("cannot listen"), std::string::npos) << error;

  EXPECT_EQ(MetricsEndpoint::start(m, o, nullptr), nullptr);  // no error string wanted: fine
}

// Two clients that start a request and never finish it must not hold up scrapes: there are more
// workers than that, and a worker gives up on a request after a short timeout (with civetweb's
// defaults of 2 workers and 30 s, three scrapes in a row timed out).
TEST(MetricsEndpointTest, TwoHalfSentRequestsDoNotHoldUpScrapes) {
  HostMetrics m;
  std::string error;
  auto endpoint = MetricsEndpoint::start(m, any_port(), &error);
  ASSERT_NE(endpoint, nullptr) << error;
  const int a = half_sent_request(endpoint->port());
  const int b = half_sent_request(endpoint->port());
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  for (int i = 0; i < 3; ++i) {
    const std::string response = http_get(endpoint->port(), "/metrics");  // 5 s at most
    EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << "scrape " << i << ": " << response;
  }
  ::close(a);
  ::close(b);
}

// Even with every worker held by a half-sent request, a scrape is served once the request
// timeout frees a worker, and the stalled client is disconnected.
TEST(MetricsEndpointTest, HalfSentRequestsAreDroppedAfterTheRequestTimeout) {
  HostMetrics m;
  EndpointOptions o = any_port();
  o.threads = 1;
  o.request_timeout = std::chrono::milliseconds(300);
  std::string error;
  auto endpoint = MetricsEndpoint::start(m, o, &error);
  ASSERT_NE(endpoint, nullptr) << error;
  const int stalled = half_sent_request(endpoint->port());
  ASSERT_GE(stalled, 0);
  const std::string response = http_get(endpoint->port(), "/metrics");  // 5 s at most
  EXPECT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
  // The stalled connection was closed by the server (EOF or a reset, maybe after an error page).
  timeval tv{5, 0};
  ::setsockopt(stalled, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[4096];
  ssize_t n = 0;
  while ((n = ::recv(stalled, buf, sizeof buf, 0)) > 0) {
  }
  EXPECT_TRUE(n == 0 || errno == ECONNRESET) << "still open: " << std::strerror(errno);
  ::close(stalled);
}

TEST(MetricsEndpointTest, KeepsTheRegistryAliveAfterTheMetricsAreGone) {
  std::unique_ptr<MetricsEndpoint> endpoint;
  {
    HostMetricsOptions o;
    o.version = "9.9.9";
    HostMetrics m(o);
    std::string error;
    endpoint = MetricsEndpoint::start(m, any_port(), &error);
    ASSERT_NE(endpoint, nullptr) << error;
  }
  EXPECT_NE(http_get(endpoint->port(), "/metrics").find("version=\"9.9.9\""), std::string::npos);
}

}  // namespace
}  // namespace memsnap::metrics
