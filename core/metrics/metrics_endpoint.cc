#include "core/metrics/metrics_endpoint.h"

#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "core/metrics/host_metrics.h"

namespace memsnap::metrics {

namespace {

// civetweb's listening_ports syntax: "127.0.0.1:9464", "[::1]:9464".
std::string host_port(const std::string& address, std::uint16_t port) {
  const bool v6 = address.find(':') != std::string::npos;
  return (v6 ? "[" + address + "]" : address) + ":" + std::to_string(port);
}

void set(std::string* error, std::string message) {
  if (error != nullptr) *error = std::move(message);
}

}  // namespace

std::unique_ptr<MetricsEndpoint> MetricsEndpoint::start(const HostMetrics& metrics,
                                                        const EndpointOptions& options,
                                                        std::string* error) noexcept {
  try {
    if (options.address.empty()) {
      set(error, "metrics endpoint: no address to listen on");
      return nullptr;
    }
    // civetweb reads a comma as a list of ports and a trailing 's' or 'r' as TLS / redirect
    // options: refuse them rather than bind something other than what was asked.
    if (options.address.find_first_of(",[] ") != std::string::npos) {
      set(error, "metrics endpoint: bad address \"" + options.address + "\"");
      return nullptr;
    }
    if (options.path.empty() || options.path.front() != '/') {
      set(error, "metrics endpoint: the path must start with '/', got \"" + options.path + "\"");
      return nullptr;
    }
    const std::string where = host_port(options.address, options.port);
    std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
    endpoint->registry_ = metrics.registry();
    endpoint->address_ = options.address;
    endpoint->path_ = options.path;
    try {
      // Throws (CivetException, a std::runtime_error) when the port cannot be bound.
      const std::size_t threads = options.threads == 0 ? std::size_t{1} : options.threads;
      const auto timeout_ms = std::max<std::chrono::milliseconds::rep>(
          1, options.request_timeout.count());
      endpoint->exposer_ = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
          "listening_ports", where, "num_threads", std::to_string(threads),
          "request_timeout_ms", std::to_string(timeout_ms)});
    } catch (const std::exception& e) {
      // Debian 12's civetweb is built without IPv6: say so rather than blame the port.
      const bool v6 = options.address.find(':') != std::string::npos;
      set(error, "metrics endpoint: cannot listen on " + where +
                     (v6 ? " (IPv6: civetweb may be built without it; use an IPv4 address)"
                         : " (port in use, or not an address of this host)") +
                     ": " + e.what());
      return nullptr;
    }
    endpoint->exposer_->RegisterCollectable(endpoint->registry_, options.path);
    const std::vector<int> ports = endpoint->exposer_->GetListeningPorts();
    if (ports.empty() || ports.front() <= 0 || ports.front() > 65535) {
      set(error, "metrics endpoint: listening on " + where + " but the bound port is unknown");
      return nullptr;
    }
    endpoint->port_ = static_cast<std::uint16_t>(ports.front());
    return endpoint;
  } catch (const std::exception& e) {
    set(error, std::string("metrics endpoint: ") + e.what());
  } catch (...) {
    set(error, "metrics endpoint: unknown error");
  }
  return nullptr;
}

MetricsEndpoint::~MetricsEndpoint() = default;

std::string MetricsEndpoint::url() const { return "http://" + host_port(address_, port_) + path_; }

}  // namespace memsnap::metrics
