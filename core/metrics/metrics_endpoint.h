// Serves a HostMetrics registry over HTTP for Prometheus to scrape (prometheus-cpp's pull
// exposer, civetweb underneath). Loopback by default: the metrics say which strategies run on a
// host and how the rollout goes, which is nobody's business off the host unless configured so.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace memsnap::metrics {

class HostMetrics;

struct EndpointOptions {
  // An IPv4 address. IPv6 ("::1", no brackets) only where civetweb was built with it, which
  // Debian 12's is not.
  std::string address = "127.0.0.1";
  std::uint16_t port = 9464;  // 0: any free port (see MetricsEndpoint::port())
  std::string path = "/metrics";
  // civetweb worker threads. Each serves one connection at a time, so a client that starts a
  // request and stalls holds one for up to request_timeout: a few of those must not hold up
  // Prometheus (civetweb's own default through prometheus-cpp was 2 workers and 30 s).
  std::size_t threads = 8;
  // How long civetweb waits for a request to arrive, and for each read or write of it.
  std::chrono::milliseconds request_timeout{5000};
};

class MetricsEndpoint {
 public:
  // Starts serving metrics.registry(). On failure (the port is taken, the address is not one of
  // this host's, bad options) returns null and sets *error to why; never throws. The endpoint
  // keeps the registry alive, so it may outlive `metrics`.
  static std::unique_ptr<MetricsEndpoint> start(const HostMetrics& metrics,
                                                const EndpointOptions& options,
                                                std::string* error) noexcept;
  // Stops serving. Can take up to 2 s: civetweb's listening thread polls in 2 s quanta.
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // The port actually bound (the chosen one when options.port was 0).
  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }
  // e.g. "http://127.0.0.1:9464/metrics"
  [[nodiscard]] std::string url() const;

 private:
  MetricsEndpoint() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
  std::string path_;
  std::uint16_t port_ = 0;
};

}  // namespace memsnap::metrics
