/*
 * netbootd.tftp._pump: the per-block loop of one TFTP read transfer, in C, run with
 * the GIL released.
 *
 * Why this is hand-written C (and the only C in netbootd): a Pi loads ~33 MB one block
 * per round trip, and 20 such transfers at once must not take longer than in.tftpd,
 * which forks a C process per transfer. Measured on the 2-vCPU test VM (docs/tftp.md):
 * Python worker processes moving blocks (any number of them, pinned or not) stayed at
 * 1.45-1.95x in.tftpd on 20 x 8 MiB; a single-process C server (dnsmasq) is 1.3x; a
 * C loop in a thread per transfer is 0.94x. A blocked thread per transfer lets the
 * scheduler keep each transfer next to its client, and with the GIL released, threads
 * of one worker process run on every CPU. No library does a TFTP data plane; tftpy's
 * server is Python.
 *
 * Scope: only the data plane of a transfer that the daemon already admitted and
 * negotiated (netbootd/tftp/transfer.py is the reference, and the fallback when this
 * module is not built). Same rules: RFC 1350 lock-step and RFC 7440 windows, 16-bit
 * block numbers wrapping, duplicate ACKs never resend (sorcerer's apprentice), one
 * retransmit deadline per transfer with bounded retries, ERROR 5 from the transfer's
 * port to anyone but the client, never an ERROR answered with an ERROR, a client's
 * ERROR ends the transfer as "aborted", a readable stop descriptor ends it with
 * ERROR 0 "server stopping".
 *
 * run(sock_fd, stranger_fd, data, blksize, windowsize, timeout, retries, oack, stop_fd)
 *   -> (outcome, reason, blocks_acked, payload_sent, packets_sent, malformed)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_RRQ = 1, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK };

struct xfer {
    int sock, stranger, stop;
    const unsigned char *data;
    Py_ssize_t size;
    long blksize, window, retries_max, retries;
    int64_t nblocks, acked, sent_to;
    const unsigned char *oack;
    Py_ssize_t oack_len;
    int await_oack;
    double timeout, deadline, now;
    long long payload_sent, packets_sent, malformed;
    char reason[256];
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A send error is not the transfer's end: a full buffer or an ICMP error (the client's
 * port gone for a moment) is recovered by the retransmit deadline, as in transfer.py. */
static void send_raw(struct xfer *x, const void *pkt, size_t len)
{
    if (send(x->sock, pkt, len, 0) >= 0)
        x->packets_sent++;
}

static void send_error(struct xfer *x, unsigned code, const char *msg)
{
    unsigned char pkt[300];
    size_t n = strlen(msg);
    if (n > sizeof pkt - 5)
        n = sizeof pkt - 5;
    pkt[0] = 0;
    pkt[1] = OP_ERROR;
    pkt[2] = (code >> 8) & 0xff;
    pkt[3] = code & 0xff;
    memcpy(pkt + 4, msg, n);
    pkt[4 + n] = 0;
    send_raw(x, pkt, n + 5);
}

/* Blocks acked+1 .. acked+window, header and payload gathered by the kernel (no copy). */
static void send_window(struct xfer *x)
{
    int64_t last = x->acked + x->window;
    if (last > x->nblocks)
        last = x->nblocks;
    for (int64_t n = x->acked + 1; n <= last; n++) {
        Py_ssize_t off = (Py_ssize_t)((n - 1) * x->blksize);
        Py_ssize_t len = x->size - off;
        if (len > x->blksize)
            len = x->blksize;
        if (len < 0)
            len = 0;
        unsigned char hdr[4] = {0, OP_DATA, (unsigned char)((n >> 8) & 0xff),
                                (unsigned char)(n & 0xff)};
        struct iovec iov[2] = {{hdr, 4}, {(void *)(x->data + off), (size_t)len}};
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
        if (sendmsg(x->sock, &mh, 0) < 0)
            break; /* buffer full, or an ICMP error: the next ACK or the deadline resends */
        x->packets_sent++;
        x->payload_sent += len;
        if (n > x->sent_to)
            x->sent_to = n;
    }
}

static void progress(struct xfer *x)
{
    x->retries = 0;
    x->deadline = x->now + x->timeout;
}

/* Whatever reaches the transfer's port from anyone but the client. */
static void on_stranger(struct xfer *x)
{
    unsigned char buf[1024];
    struct sockaddr_storage from;
    socklen_t flen = sizeof from;
    ssize_t n = recvfrom(x->stranger, buf, sizeof buf, 0, (struct sockaddr *)&from, &flen);
    if (n < 0)
        return;
    if (n < 4 || buf[0] != 0 || buf[1] < OP_RRQ || buf[1] > OP_OACK) {
        x->malformed++;
        return;
    }
    if (buf[1] == OP_ERROR)
        return;
    static const unsigned char err5[] = "\0\5\0\5Unknown transfer ID";
    sendto(x->stranger, err5, sizeof err5, 0, (struct sockaddr *)&from, flen);
}

/* One datagram from the client. Returns 1 when the transfer has ended. */
static int on_client(struct xfer *x, const char **outcome)
{
    unsigned char buf[1024];
    ssize_t n = recv(x->sock, buf, sizeof buf, 0);
    if (n < 0)
        return 0; /* EAGAIN, or ECONNREFUSED from the client's host: keep waiting */
    if (n >= 4 && buf[0] == 0) {
        unsigned op = buf[1];
        unsigned wire = ((unsigned)buf[2] << 8) | buf[3];
        if (op == OP_ACK) {
            if (x->await_oack) {
                if (wire == 0) { /* the OACK is acknowledged; anything else is stray */
                    x->await_oack = 0;
                    progress(x);
                    send_window(x);
                }
                return 0;
            }
            /* Map the 16-bit number into [acked, sent_to]; anything else is stale or a
             * duplicate, and a duplicate must never resend. */
            int64_t delta = (int64_t)((wire - (unsigned)(x->acked & 0xffff)) & 0xffff);
            if (delta == 0 || x->acked + delta > x->sent_to)
                return 0;
            x->acked += delta;
            if (x->acked >= x->nblocks) {
                *outcome = "ok";
                return 1;
            }
            send_window(x);
            progress(x);
            return 0;
        }
        if (op == OP_ERROR) {
            /* The message ends at a NUL or the datagram's end; shown in logs only. */
            Py_ssize_t len = n - 4;
            const unsigned char *nul = memchr(buf + 4, 0, (size_t)len);
            if (nul)
                len = nul - (buf + 4);
            if (len > 200)
                len = 200;
            snprintf(x->reason, sizeof x->reason, "client error %u: %.*s", wire, (int)len,
                     (const char *)(buf + 4));
            *outcome = "aborted";
            return 1;
        }
        if (op == OP_RRQ || op == OP_WRQ || op == OP_DATA || op == OP_OACK)
            return 0; /* well-formed but meaningless here (a resent RRQ): ignore */
    }
    x->malformed++;
    return 0;
}

/* Why one epoll set per transfer and not poll(): the set is built once, so each block
 * costs one epoll_wait on a ready list instead of registering three wait queues. */
static const char *run(struct xfer *x)
{
    const char *outcome = NULL;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        snprintf(x->reason, sizeof x->reason, "epoll_create1: %s", strerror(errno));
        return "error";
    }
    int fds[3] = {x->sock, x->stranger, x->stop};
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (fds[i] >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            snprintf(x->reason, sizeof x->reason, "epoll_ctl: %s", strerror(errno));
            close(ep);
            return "error";
        }
    }
    if (x->await_oack)
        send_raw(x, x->oack, (size_t)x->oack_len);
    else
        send_window(x);
    x->now = now_s();
    x->deadline = x->now + x->timeout;
    for (;;) {
        double left = x->deadline - x->now;
        int ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        struct epoll_event evs[3];
        int r = epoll_wait(ep, evs, 3, ms);
        x->now = now_s(); /* one clock read per wake-up: progress() uses it too */
        if (r < 0) {
            if (errno == EINTR)
                continue;
            snprintf(x->reason, sizeof x->reason, "epoll_wait: %s", strerror(errno));
            outcome = "error";
            break;
        }
        if (r == 0) {
            if (x->now < x->deadline)
                continue;
            if (++x->retries > x->retries_max) {
                send_error(x, 0, "Timeout");
                snprintf(x->reason, sizeof x->reason, "timeout after %ld retries",
                         x->retries_max);
                outcome = "error";
                break;
            }
            x->deadline = x->now + x->timeout;
            if (x->await_oack)
                send_raw(x, x->oack, (size_t)x->oack_len);
            else
                send_window(x);
            continue;
        }
        int client = 0, stranger = 0, stop = 0;
        for (int i = 0; i < r; i++) {
            client |= evs[i].data.u32 == 0;
            stranger |= evs[i].data.u32 == 1;
            stop |= evs[i].data.u32 == 2;
        }
        if (stop) {
            send_error(x, 0, "server stopping");
            snprintf(x->reason, sizeof x->reason, "server stopping");
            outcome = "aborted";
            break;
        }
        if (stranger)
            on_stranger(x);
        if (client && on_client(x, &outcome))
            break;
    }
    close(ep);
    return outcome;
}

static PyObject *pump_run(PyObject *self, PyObject *args)
{
    int sock, stranger, stop;
    Py_buffer data, oack = {0};
    long blksize, window, retries;
    double timeout;
    if (!PyArg_ParseTuple(args, "iiy*lldlz*i", &sock, &stranger, &data, &blksize, &window,
                          &timeout, &retries, &oack, &stop))
        return NULL;
    if (blksize < 8 || blksize > 65464 || window < 1 || window > 65535 || timeout <= 0
        || retries < 0) {
        PyBuffer_Release(&data);
        if (oack.obj)
            PyBuffer_Release(&oack);
        PyErr_SetString(PyExc_ValueError, "blksize, windowsize, timeout or retries out of range");
        return NULL;
    }
    struct xfer x = {
        .sock = sock, .stranger = stranger, .stop = stop,
        .data = data.buf, .size = data.len,
        .blksize = blksize, .window = window, .retries_max = retries,
        .nblocks = (int64_t)(data.len / blksize) + 1,
        .oack = oack.buf, .oack_len = oack.buf ? oack.len : 0,
        .await_oack = oack.buf != NULL && oack.len > 0,
        .timeout = timeout,
    };
    const char *outcome;
    Py_BEGIN_ALLOW_THREADS
    outcome = run(&x);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (oack.obj)
        PyBuffer_Release(&oack);
    /* A client's ERROR text is whatever bytes it sent: decode leniently, as codec.py does. */
    PyObject *reason = PyUnicode_DecodeUTF8(x.reason, (Py_ssize_t)strlen(x.reason), "replace");
    if (reason == NULL)
        return NULL;
    return Py_BuildValue("(sNLLLL)", outcome, reason, (long long)x.acked, x.payload_sent,
                         x.packets_sent, x.malformed);
}

static PyMethodDef methods[] = {
    {"run", pump_run, METH_VARARGS,
     "run(sock_fd, stranger_fd, data, blksize, windowsize, timeout, retries, oack, stop_fd)"
     " -> (outcome, reason, blocks_acked, payload_sent, packets_sent, malformed)\n\n"
     "Send one admitted transfer to completion with the GIL released (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netbootd.tftp._pump",
    "The TFTP per-block loop in C, run with the GIL released (see _pump.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__pump(void)
{
    return PyModule_Create(&module);
}
