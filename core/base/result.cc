#include "core/base/result.h"

namespace memsnap {

std::string_view errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::kOk:
      return "ok";
    case Errc::kInvalidArgument:
      return "invalid_argument";
    case Errc::kIoError:
      return "io_error";
    case Errc::kNotFound:
      return "not_found";
    case Errc::kUnsupported:
      return "unsupported";
    case Errc::kInternal:
      return "internal";
    case Errc::kPluginCannotOpen:
      return "plugin_cannot_open";
    case Errc::kPluginNoAbiSymbol:
      return "plugin_no_abi_symbol";
    case Errc::kPluginAbiMismatch:
      return "plugin_abi_mismatch";
    case Errc::kPluginBadDescriptor:
      return "plugin_bad_descriptor";
    case Errc::kPluginNoFactory:
      return "plugin_no_factory";
    case Errc::kPluginFactoryFailed:
      return "plugin_factory_failed";
    case Errc::kPluginDuplicateName:
      return "plugin_duplicate_name";
    case Errc::kPluginUnsafeFile:
      return "plugin_unsafe_file";
    case Errc::kPluginNotLoaded:
      return "plugin_not_loaded";
    case Errc::kSnapshotTruncated:
      return "snapshot_truncated";
    case Errc::kSnapshotBadMagic:
      return "snapshot_bad_magic";
    case Errc::kSnapshotBadVersion:
      return "snapshot_bad_version";
    case Errc::kSnapshotBadHeader:
      return "snapshot_bad_header";
    case Errc::kSnapshotBadMap:
      return "snapshot_bad_map";
    case Errc::kSnapshotChecksumMismatch:
      return "snapshot_checksum_mismatch";
    case Errc::kSnapshotChainMismatch:
      return "snapshot_chain_mismatch";
    case Errc::kSnapshotIncomplete:
      return "snapshot_incomplete";
    case Errc::kExportFailed:
      return "export_failed";
    case Errc::kProcessGone:
      return "process_gone";
    case Errc::kBadAddress:
      return "bad_address";
    case Errc::kHandshakeTimeout:
      return "handshake_timeout";
    case Errc::kHandshakeProtocol:
      return "handshake_protocol";
    case Errc::kHandshakeBadRegions:
      return "handshake_bad_regions";
    case Errc::kHandshakeBadFd:
      return "handshake_bad_fd";
    case Errc::kResumeFailed:
      return "resume_failed";
    case Errc::kGenerationMismatch:
      return "generation_mismatch";
    case Errc::kAlreadyExists:
      return "already_exists";
    case Errc::kInvalidState:
      return "invalid_state";
    case Errc::kBusy:
      return "busy";
    case Errc::kPathNotAllowed:
      return "path_not_allowed";
    case Errc::kShuttingDown:
      return "shutting_down";
    case Errc::kTimeout:
      return "timeout";
    case Errc::kSandboxNotFound:
      return "sandbox_not_found";
    case Errc::kDataAtRisk:
      return "data_at_risk";
    case Errc::kForbidden:
      return "forbidden";
    case Errc::kLimitReached:
      return "limit_reached";
  }
  return "unknown";
}

std::string Error::to_string() const {
  std::string out(errc_name(code));
  out += ": ";
  out += message;
  return out;
}

}  // namespace memsnap
