// Error codes and the Result type returned by every runtime path of the host.
//
// Codes are stable: their names (errc_name) appear in CLI output, JSON and, later, the control
// API, so rename none; add new ones at the end of their group.
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace memsnap {

enum class Errc {
  kOk = 0,
  // generic
  kInvalidArgument,
  kIoError,
  kNotFound,
  kUnsupported,
  kInternal,
  // plugin loading (PluginRegistry)
  kPluginCannotOpen,
  kPluginNoAbiSymbol,
  kPluginAbiMismatch,
  kPluginBadDescriptor,
  kPluginNoFactory,
  kPluginFactoryFailed,
  kPluginDuplicateName,
  kPluginUnsafeFile,
  kPluginNotLoaded,
  // snapshot files
  kSnapshotTruncated,
  kSnapshotBadMagic,
  kSnapshotBadVersion,
  kSnapshotBadHeader,
  kSnapshotBadMap,
  kSnapshotChecksumMismatch,
  kSnapshotChainMismatch,
  kSnapshotIncomplete,  // the writer was not given every byte it was promised
  // export
  kExportFailed,
  kProcessGone,
  kBadAddress,
  // UFFD handshake (core/handshake) and resume
  kHandshakeTimeout,     // no VMM connected, or it sent nothing, in time
  kHandshakeProtocol,    // the message itself is wrong: truncated, wrong fd count, no message
  kHandshakeBadRegions,  // the region JSON is malformed or does not fit the snapshot
  kHandshakeBadFd,       // a received fd is not what it should be (not a userfaultfd / memfd)
  kResumeFailed,         // serving guest memory failed (uffd ioctl error, VMM gone mid-fill)
  kGenerationMismatch,   // a retained memfd does not hold the snapshot asked for
  // the host daemon (memsnapd) and its control API
  kAlreadyExists,   // a sandbox with that id is registered
  kInvalidState,    // the sandbox is not in a state that allows this (e.g. resume of a running one)
  kBusy,            // the sandbox is already pausing or resuming
  kPathNotAllowed,  // a snapshot path outside the snapshot directory (or through a symlink)
  kShuttingDown,    // the daemon is draining: no new pauses or resumes
  kTimeout,         // waited for a state that did not come in time
  kSandboxNotFound, // no sandbox with that id is registered
  kForbidden,       // the caller may not do this (not the owner of the process or sandbox)
  kLimitReached,    // a configured limit (e.g. limits.max_sandboxes) is reached
  // data safety
  kDataAtRisk,  // a pause failed after releasing guest memory it could not put back: the VMM is
                // left stopped and the only copy of those bytes is the kept file the message names
};

// The stable snake_case name of a code, e.g. "plugin_abi_mismatch".
std::string_view errc_name(Errc code) noexcept;

struct Error {
  Errc code = Errc::kInternal;
  std::string message;
  int sys_errno = 0;

  // "plugin_abi_mismatch: <message>"
  [[nodiscard]] std::string to_string() const;

  // The same code and errno with the message "<context>: <message>", e.g.
  // `return std::move(r).error().with_context("reading " + path);`
  [[nodiscard]] Error with_context(std::string_view context) const& {
    return Error(*this).with_context(context);
  }
  [[nodiscard]] Error with_context(std::string_view context) && {
    message.insert(0, ": ").insert(0, context);
    return std::move(*this);
  }
};

[[nodiscard]] inline Error make_error(Errc code, std::string message, int sys_errno = 0) {
  return Error{code, std::move(message), sys_errno};
}

// A value or an Error. Access to the wrong alternative is a bug (asserted).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}      // NOLINT: implicit by design
  Result(Error error) : v_(std::move(error)) {}  // NOLINT

  [[nodiscard]] bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

  const Error& error() const& {
    assert(!ok());
    return std::get<1>(v_);
  }
  Error&& error() && {
    assert(!ok());
    return std::get<1>(std::move(v_));
  }

 private:
  std::variant<T, Error> v_;
};

// Result of an operation without a value.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT

  [[nodiscard]] bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const Error& error() const& {
    assert(!ok_);
    return error_;
  }
  Error&& error() && {
    assert(!ok_);
    return std::move(error_);
  }

 private:
  Error error_;
  bool ok_ = true;
};

}  // namespace memsnap

// Early returns for functions that return a Status or any Result<U> (an Error converts to both).
// Each evaluates its expression exactly once. Neither may be the unbraced body of an if or loop.

// Returns the error of a Status or Result expression from the enclosing function if it is not
// ok; a Result's value is discarded.
//   MEMSNAP_RETURN_IF_ERROR(file.sync());
#define MEMSNAP_RETURN_IF_ERROR(...)                       \
  do {                                                     \
    auto memsnap_status_or_result_ = (__VA_ARGS__);        \
    if (!memsnap_status_or_result_.ok()) {                 \
      return std::move(memsnap_status_or_result_).error(); \
    }                                                      \
  } while (false)

// Evaluates a Result<T> expression into a hidden local; returns its error from the enclosing
// function if it is not ok, else moves the value into `lhs`: a declaration (`auto fd`,
// `std::string name`, `const Header& h`) or an existing lvalue. `lhs` must not contain a comma
// outside parentheses (write `auto` for such types).
//   MEMSNAP_ASSIGN_OR_RETURN(auto fd, open_file(path));
#define MEMSNAP_ASSIGN_OR_RETURN(lhs, ...)                                                  \
  MEMSNAP_ASSIGN_OR_RETURN_IMPL_(MEMSNAP_RESULT_CONCAT_(memsnap_result_, __COUNTER__), lhs, \
                                 __VA_ARGS__)

#define MEMSNAP_ASSIGN_OR_RETURN_IMPL_(result, lhs, ...) \
  auto result = (__VA_ARGS__);                           \
  if (!result.ok()) return std::move(result).error();    \
  lhs = std::move(result).value()

#define MEMSNAP_RESULT_CONCAT_INNER_(a, b) a##b
#define MEMSNAP_RESULT_CONCAT_(a, b) MEMSNAP_RESULT_CONCAT_INNER_(a, b)
