// A listening Unix stream socket whose file has exactly the permissions asked for, shared by the
// UFFD handshake listener (core/handshake) and memsnapd's control API (tools/control_api).
#pragma once

#include <sys/types.h>

#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "core/base/file_io.h"
#include "core/base/result.h"

namespace memsnap::io {

struct ListeningSocket {
  UniqueFd fd;    // non-blocking, close-on-exec
  dev_t dev = 0;  // identity of the socket file, to remove only our own later
  ino_t ino = 0;
};

// Creates the socket at `path` and listens. The file never exists with more permission bits than
// `mode`, and has exactly `mode` (and `group`, if given) before anyone can connect:
//  - the mode is set on the socket inode before bind (Linux creates the file with it, minus the
//    umask), without touching the process-wide umask;
//  - between bind and listen (connect is refused until listen) group and mode are set by path and
//    checked with lstat.
// What is at `path` already: nothing is fine; a socket nobody listens on (left by a process that
// died) is replaced; a live socket or any other kind of file (a symlink too) is refused and left
// alone. Errors: kInvalidArgument (bad path or mode, something in the way), kIoError (a system
// call failed; the message names it and the path). On error nothing of ours is left at `path`.
Result<ListeningSocket> listen_unix(const std::string& path, mode_t mode,
                                    std::optional<gid_t> group, int backlog);

// Removes the socket file at `path` if it is still the one `socket` created.
void unlink_if_ours(const std::string& path, const ListeningSocket& socket);

// Sends all of payload on a connected Unix socket with fds (at most 4; none if empty) attached
// to its first byte as one SCM_RIGHTS message; continues after a partial send, retries EINTR,
// never raises SIGPIPE. kIoError naming `what` on failure. Not for non-blocking sockets.
Status send_with_fds(int socket, std::string_view payload, std::span<const int> fds,
                     const std::string& what);

}  // namespace memsnap::io
