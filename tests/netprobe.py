"""What a process tree listens on (from /proc, Linux), and whether a port serves a client without Ray's token."""
import ipaddress
import os
import socket
import struct
import urllib.error
import urllib.request

# gRPC methods of Ray's servers (GCS, raylet node manager, object manager, core worker: drivers and actors).
RAY_METHODS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats")


def descendants(root: int) -> set:
    """`root` and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def live_descendants() -> set:
    """The processes below this one that are still running (a zombie counts as gone)."""
    return {p for p in descendants(os.getpid()) if p != os.getpid() and alive(p)}


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped by its new parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    words = struct.unpack(">4I", raw)
    return socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words))


def listening(pids) -> list:
    """(pid, address, port) of every TCP socket in LISTEN state owned by `pids`."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in owner:
                    addr, port = local.split(":")
                    out.append((owner[inode], _address(addr), int(port, 16)))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def reachable_address(bound: str) -> str:
    """An address a client on the network would use for a socket bound to `bound` (a wildcard: this
    machine's non-loopback address)."""
    if bound not in ("0.0.0.0", "::"):
        return bound
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
    finally:
        s.close()


def grpc_codes(host: str, port: int, token=None) -> dict:
    """Status of each Ray gRPC method at host:port, with or without the bearer token."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    codes = {}
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in RAY_METHODS:
            call = channel.unary_unary(method)
            try:
                call(b"", timeout=5, metadata=metadata)
                codes[method] = "OK"
            except grpc.RpcError as e:
                codes[method] = e.code().name
    return codes


def http_status(host: str, port: int) -> int:
    """The HTTP status of GET / without credentials (0: not an HTTP server)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:  # noqa: BLE001 - not HTTP (a gRPC port answers with garbage or closes)
        return 0
