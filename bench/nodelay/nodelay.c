/*
 * LD_PRELOAD shim for the benchmark's load generator: TCP_NODELAY on every TCP connect().
 *
 * ab (ApacheBench) never sets TCP_NODELAY. With TLS 1.3 its first request is written right
 * after the client's last handshake flight; Nagle holds that small write until the flight is
 * ACKed, and a server that sends no session ticket has nothing to piggy-back the ACK on, so
 * the request waits for the server's delayed-ACK timer (~40 ms on Linux). New-connection runs
 * then top out near 350 handshakes/s with an idle server core. bench/ runs every ab under this
 * shim (all targets alike) so those rows measure the servers.
 *
 * Built at run time by bench/shim.py:  gcc -O2 -shared -fPIC -o nodelay.so nodelay.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <sys/socket.h>

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

static void set_nodelay(int fd, const struct sockaddr *addr) {
    int type = 0;
    socklen_t len = sizeof type;
    int one = 1;

    if (addr == NULL || (addr->sa_family != AF_INET && addr->sa_family != AF_INET6))
        return;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
        return;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int connect(int fd, const struct sockaddr *addr, socklen_t addrlen) {
    static connect_fn real_connect;
    int rc;
    int saved;

    if (real_connect == NULL) {
        real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
        if (real_connect == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    rc = real_connect(fd, addr, addrlen);
    saved = errno;
    if (rc == 0 || saved == EINPROGRESS)
        set_nodelay(fd, addr);
    errno = saved;
    return rc;
}
