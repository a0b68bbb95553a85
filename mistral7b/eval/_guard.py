"""Runs one generated program under Python-level guards: `python -I _guard.py PROGRAM`.

An audit hook (it cannot be removed once added) refuses sockets, new processes, native code
loading, and any file write, rename, removal or mode change outside the working directory (the
sandbox's temp dir). Memory, CPU time and file sizes are bounded by rlimits set by the parent.
"""

import os
import sys

ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
REFUSED = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
})
PATH_ARGS = {  # event -> positions of the path arguments it changes
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
    "os.chown": (0,), "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "os.chflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
}


def inside(path) -> bool:
    if isinstance(path, int):  # an already opened descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == ROOT or real.startswith(ROOT + os.sep)


def hook(event, args):
    if event in REFUSED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing {path} is not allowed")
    elif event in PATH_ARGS:
        for i in PATH_ARGS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]} is not allowed")


def main():
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    sys.addaudithook(hook)
    exec(code, {"__name__": "__main__", "__file__": path})


if __name__ == "__main__":
    main()
