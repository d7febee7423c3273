/*
 * netbootd.tftp._pump: the TFTP block loop, in C, run with the GIL released. It is the
 * only block loop in netbootd: every transfer, however many there are, runs here.
 *
 * Why hand-written C (and the only C in netbootd): a Pi loads ~33 MB one block per round
 * trip, and 20 such transfers at once must not take longer than in.tftpd, which forks a
 * C process per transfer. Measured on the 2-vCPU test VM (docs/tftp.md): Python moving
 * blocks (any number of processes) stayed at 1.45-1.95x in.tftpd on 20 x 8 MiB; a C loop
 * in a thread per transfer was 0.94x. No library does a TFTP data plane; tftpy's server
 * is Python.
 *
 * Why a *set* of transfers per thread: a blocked thread per transfer lets the kernel wake
 * each transfer next to its client (what wins 20 x 8 MiB), but with 100 Pis a thread per
 * transfer is a context switch per block per transfer (the 100-Pi storm: 24-31 s slowest
 * file), while one loop that serves every ready transfer per wake-up was 16-19 s. A
 * `Pump` is one thread's epoll set over any number of transfers; the Python side
 * (netbootd/tftp/pumps.py) runs up to `tftp.pump_threads` of them per process and gives
 * each new transfer to the least loaded, so a few transfers get a thread each and many
 * share them.
 *
 * Scope: only the data plane of a transfer the daemon already admitted and negotiated
 * (options are parsed in Python: codec.py, transfer.py). Rules: RFC 1350 lock-step and
 * RFC 7440 windows (after ACK k the window restarts at k+1), 16-bit block numbers
 * wrapping, a duplicate ACK never resends (sorcerer's apprentice), one retransmit
 * deadline per transfer with bounded retries, and a cap on the total time without
 * progress (`stall_max`, so no option can make a silent client hold a slot for long),
 * ERROR 5 from the transfer's port to anyone but the client, never an ERROR answered
 * with an ERROR, a client's ERROR ends the transfer as "aborted", abort(id) and stop()
 * end transfers with ERROR 0 and the reason given.
 *
 * Pump() -> object
 *   add(id, sock_fd, stranger_fd, data, blksize, windowsize, timeout, retries, oack,
 *       stall_max)   thread-safe; the pump owns (and closes) both descriptors from here
 *   abort(id, reason)   thread-safe; ends that transfer with ERROR 0 <reason>
 *   stop()   thread-safe; ends every transfer with ERROR 0 "server stopping"
 *   serve() -> list | None   runs the loop (GIL released) until something is to report:
 *       ("progress", id): the client acknowledged its first data block;
 *       ("done", id, outcome, reason, blocks_acked, payload_sent, packets_sent,
 *        malformed, seconds); None once stopped and every transfer was reported.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_RRQ = 1, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK };
#define WAKE_TAG UINT64_MAX
#define MAX_EVENTS 64

struct xfer {
    long long id;
    int sock, stranger, slot;
    Py_buffer view;
    const unsigned char *data;
    Py_ssize_t size;
    long blksize, window, retries_max, retries;
    int64_t nblocks, acked, sent_to;
    unsigned char *oack;
    size_t oack_len;
    int await_oack, progressed;
    double timeout, deadline, stall_max, last_progress, started;
    long long payload_sent, packets_sent, malformed;
    const char *outcome;
    char reason[256];
    struct xfer *next;
};

struct abort_req {
    long long id;
    char reason[200];
    struct abort_req *next;
};

typedef struct {
    PyObject_HEAD
    int ep, wake;
    pthread_mutex_t lock;
    /* under lock: handed over by other threads */
    struct xfer *pending;
    struct abort_req *aborts;
    int stop_requested;
    /* the serving thread's own */
    struct xfer **slots;
    int nslots, count;
    int stopped, serving;
    double next_due;
    struct xfer *done;
    long long *progress;
    int nprogress, progress_cap;
} Pump;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A send error is not the transfer's end: a full buffer or an ICMP error (the client's
 * port gone for a moment) is recovered by the retransmit deadline. */
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

static void progress_at(struct xfer *x, double now)
{
    x->retries = 0;
    x->deadline = now + x->timeout;
    x->last_progress = now;
}

static void note_progress(Pump *p, struct xfer *x)
{
    if (x->progressed)
        return;
    x->progressed = 1;
    if (p->nprogress == p->progress_cap) {
        int cap = p->progress_cap ? p->progress_cap * 2 : 16;
        long long *grown = realloc(p->progress, sizeof *grown * (size_t)cap);
        if (grown == NULL)
            return; /* the daemon then just does not know: it may evict this one first */
        p->progress = grown;
        p->progress_cap = cap;
    }
    p->progress[p->nprogress++] = x->id;
}

/* End a transfer: out of the epoll set, descriptors closed, onto the done list. The
 * Python buffer is released later, with the GIL, in serve(). */
static void finish(Pump *p, struct xfer *x, const char *outcome, double now)
{
    x->outcome = outcome;
    x->started = now - x->started; /* from here on: seconds it ran */
    epoll_ctl(p->ep, EPOLL_CTL_DEL, x->sock, NULL);
    close(x->sock);
    x->sock = -1;
    if (x->stranger >= 0) {
        epoll_ctl(p->ep, EPOLL_CTL_DEL, x->stranger, NULL);
        close(x->stranger);
        x->stranger = -1;
    }
    p->slots[x->slot] = NULL;
    p->count--;
    x->next = p->done;
    p->done = x;
}

static void end_with_error(Pump *p, struct xfer *x, const char *outcome, const char *msg,
                           double now)
{
    send_error(x, 0, msg);
    snprintf(x->reason, sizeof x->reason, "%s", msg);
    finish(p, x, outcome, now);
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

/* One datagram from the client. */
static void on_client(Pump *p, struct xfer *x, double now)
{
    unsigned char buf[1024];
    ssize_t n = recv(x->sock, buf, sizeof buf, 0);
    if (n < 0)
        return; /* EAGAIN, or ECONNREFUSED from the client's host: keep waiting */
    if (n >= 4 && buf[0] == 0) {
        unsigned op = buf[1];
        unsigned wire = ((unsigned)buf[2] << 8) | buf[3];
        if (op == OP_ACK) {
            if (x->await_oack) {
                if (wire == 0) { /* the OACK is acknowledged; anything else is stray */
                    x->await_oack = 0;
                    progress_at(x, now);
                    send_window(x);
                }
                return;
            }
            /* Map the 16-bit number into [acked, sent_to]; anything else is stale or a
             * duplicate, and a duplicate must never resend. */
            int64_t delta = (int64_t)((wire - (unsigned)(x->acked & 0xffff)) & 0xffff);
            if (delta == 0 || x->acked + delta > x->sent_to)
                return;
            x->acked += delta;
            note_progress(p, x);
            if (x->acked >= x->nblocks) {
                finish(p, x, "ok", now);
                return;
            }
            send_window(x);
            progress_at(x, now);
            return;
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
            finish(p, x, "aborted", now);
            return;
        }
        if (op == OP_RRQ || op == OP_WRQ || op == OP_DATA || op == OP_OACK)
            return; /* well-formed but meaningless here (a resent RRQ): ignore */
    }
    x->malformed++;
}

static int grow_slots(Pump *p)
{
    int n = p->nslots ? p->nslots * 2 : 8;
    struct xfer **grown = realloc(p->slots, sizeof *grown * (size_t)n);
    if (grown == NULL)
        return -1;
    for (int i = p->nslots; i < n; i++)
        grown[i] = NULL;
    p->slots = grown;
    p->nslots = n;
    return 0;
}

/* Put a handed-over transfer into the epoll set and send its first packet. */
static void begin(Pump *p, struct xfer *x, double now)
{
    int slot = -1;
    for (int i = 0; i < p->nslots; i++)
        if (p->slots[i] == NULL) {
            slot = i;
            break;
        }
    if (slot < 0) {
        slot = p->nslots;
        if (grow_slots(p) < 0) {
            x->slot = -1;
            snprintf(x->reason, sizeof x->reason, "out of memory");
            goto fail;
        }
    }
    x->slot = slot;
    p->slots[slot] = x;
    p->count++;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)slot << 1};
    if (epoll_ctl(p->ep, EPOLL_CTL_ADD, x->sock, &ev) < 0) {
        snprintf(x->reason, sizeof x->reason, "epoll_ctl: %s", strerror(errno));
        goto fail;
    }
    if (x->stranger >= 0) {
        ev.data.u64 = ((uint64_t)slot << 1) | 1;
        if (epoll_ctl(p->ep, EPOLL_CTL_ADD, x->stranger, &ev) < 0) {
            snprintf(x->reason, sizeof x->reason, "epoll_ctl: %s", strerror(errno));
            goto fail;
        }
    }
    x->started = now;
    progress_at(x, now);
    if (x->await_oack)
        send_raw(x, x->oack, x->oack_len);
    else
        send_window(x);
    if (x->deadline < p->next_due)
        p->next_due = x->deadline;
    return;
fail:
    x->started = now;
    if (x->slot < 0) { /* never entered the table */
        close(x->sock);
        if (x->stranger >= 0)
            close(x->stranger);
        x->sock = x->stranger = -1;
        x->outcome = "error";
        x->started = 0;
        x->next = p->done;
        p->done = x;
        return;
    }
    finish(p, x, "error", now);
}

/* Retransmit deadlines and the stall cap. The earliest due time is kept in next_due; it
 * only ever gets later through progress, so a stale value just means one early scan. */
static void check_deadlines(Pump *p, double now)
{
    double next = now + 3600.0;
    for (int i = 0; i < p->nslots; i++) {
        struct xfer *x = p->slots[i];
        if (x == NULL)
            continue;
        if (now - x->last_progress >= x->stall_max) {
            send_error(x, 0, "Timeout");
            snprintf(x->reason, sizeof x->reason, "no progress for %g s", x->stall_max);
            finish(p, x, "error", now);
            continue;
        }
        if (now >= x->deadline) {
            if (++x->retries > x->retries_max) {
                send_error(x, 0, "Timeout");
                snprintf(x->reason, sizeof x->reason, "timeout after %ld retries",
                         x->retries_max);
                finish(p, x, "error", now);
                continue;
            }
            x->deadline = now + x->timeout;
            if (x->await_oack)
                send_raw(x, x->oack, x->oack_len);
            else
                send_window(x);
        }
        double due = x->deadline;
        if (x->last_progress + x->stall_max < due)
            due = x->last_progress + x->stall_max;
        if (due < next)
            next = due;
    }
    p->next_due = next;
}

/* Adds, aborts and stop requested by other threads since the last look. */
static void take_requests(Pump *p, double now)
{
    uint64_t v;
    if (read(p->wake, &v, sizeof v) < 0) { /* EAGAIN: already read */
    }
    pthread_mutex_lock(&p->lock);
    struct xfer *adds = p->pending;
    struct abort_req *aborts = p->aborts;
    int stop = p->stop_requested;
    p->pending = NULL;
    p->aborts = NULL;
    pthread_mutex_unlock(&p->lock);
    /* the list is newest first: start them in arrival order */
    struct xfer *ordered = NULL;
    while (adds) {
        struct xfer *next = adds->next;
        adds->next = ordered;
        ordered = adds;
        adds = next;
    }
    while (ordered) {
        struct xfer *next = ordered->next;
        begin(p, ordered, now);
        ordered = next;
    }
    while (aborts) {
        struct abort_req *next = aborts->next;
        for (int i = 0; i < p->nslots; i++) {
            struct xfer *x = p->slots[i];
            if (x != NULL && x->id == aborts->id) {
                end_with_error(p, x, "aborted", aborts->reason, now);
                break;
            }
        }
        free(aborts);
        aborts = next;
    }
    if (stop)
        p->stopped = 1;
    if (p->stopped) /* also ends a transfer added after stop() */
        for (int i = 0; i < p->nslots; i++)
            if (p->slots[i] != NULL)
                end_with_error(p, p->slots[i], "aborted", "server stopping", now);
}

static void loop(Pump *p)
{
    struct epoll_event evs[MAX_EVENTS];
    while (p->done == NULL && p->nprogress == 0 && !(p->stopped && p->count == 0)) {
        double now = now_s();
        int ms = -1;
        if (p->count > 0) {
            double left = p->next_due - now;
            ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        }
        int r = epoll_wait(p->ep, evs, MAX_EVENTS, ms);
        now = now_s(); /* one clock read per wake-up, for every transfer served in it */
        if (r < 0) {
            if (errno == EINTR)
                continue;
            r = 0; /* cannot happen with a valid epoll descriptor; deadlines still run */
        }
        int wake = 0;
        for (int i = 0; i < r; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == WAKE_TAG) {
                wake = 1;
                continue;
            }
            int slot = (int)(tag >> 1);
            struct xfer *x = slot < p->nslots ? p->slots[slot] : NULL;
            if (x == NULL)
                continue; /* it ended earlier in this batch */
            if (tag & 1)
                on_stranger(x);
            else
                on_client(p, x, now);
        }
        if (wake) /* after the batch: no slot is reused while its events are pending */
            take_requests(p, now);
        if (now >= p->next_due)
            check_deadlines(p, now);
    }
}

/* ---------------------------------------------------------------- Python object */

static void free_xfer(struct xfer *x)
{
    if (x->view.obj)
        PyBuffer_Release(&x->view);
    free(x->oack);
    free(x);
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, ":Pump"))
        return NULL;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    p->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&p->lock, NULL);
    p->next_due = now_s() + 3600.0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    if (p->ep < 0 || p->wake < 0 || epoll_ctl(p->ep, EPOLL_CTL_ADD, p->wake, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(p);
        return NULL;
    }
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p)
{
    /* Only reached when no thread is in serve() (it holds a reference). */
    for (int i = 0; i < p->nslots; i++) {
        struct xfer *x = p->slots[i];
        if (x != NULL) {
            close(x->sock);
            if (x->stranger >= 0)
                close(x->stranger);
            free_xfer(x);
        }
    }
    free(p->slots);
    for (struct xfer *x = p->pending, *n; x; x = n) {
        n = x->next;
        close(x->sock);
        if (x->stranger >= 0)
            close(x->stranger);
        free_xfer(x);
    }
    for (struct xfer *x = p->done, *n; x; x = n) {
        n = x->next;
        free_xfer(x);
    }
    for (struct abort_req *a = p->aborts, *n; a; a = n) {
        n = a->next;
        free(a);
    }
    free(p->progress);
    if (p->ep >= 0)
        close(p->ep);
    if (p->wake >= 0)
        close(p->wake);
    pthread_mutex_destroy(&p->lock);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static void wake(Pump *p)
{
    uint64_t one = 1;
    if (write(p->wake, &one, sizeof one) < 0) { /* EAGAIN: a wake-up is pending anyway */
    }
}

static PyObject *Pump_add(Pump *p, PyObject *args)
{
    long long id;
    int sock, stranger;
    Py_buffer data, oack = {0};
    long blksize, window, retries;
    double timeout, stall_max;
    if (!PyArg_ParseTuple(args, "Liiy*lldlz*d", &id, &sock, &stranger, &data, &blksize,
                          &window, &timeout, &retries, &oack, &stall_max))
        return NULL;
    const char *bad = NULL;
    if (blksize < 8 || blksize > 65464 || window < 1 || window > 65535 || timeout <= 0
        || retries < 0 || stall_max <= 0)
        bad = "blksize, windowsize, timeout, retries or stall_max out of range";
    else if (sock < 0)
        bad = "no socket";
    struct xfer *x = bad ? NULL : calloc(1, sizeof *x);
    if (x != NULL && oack.buf != NULL && oack.len > 0) {
        x->oack = malloc((size_t)oack.len);
        if (x->oack == NULL) {
            free(x);
            x = NULL;
        } else {
            memcpy(x->oack, oack.buf, (size_t)oack.len);
            x->oack_len = (size_t)oack.len;
            x->await_oack = 1;
        }
    }
    if (oack.obj)
        PyBuffer_Release(&oack);
    if (x == NULL) {
        PyBuffer_Release(&data);
        if (bad)
            PyErr_SetString(PyExc_ValueError, bad);
        else
            PyErr_NoMemory();
        return NULL;
    }
    x->id = id;
    x->sock = sock;
    x->stranger = stranger;
    x->view = data; /* held until the transfer is reported */
    x->data = data.buf;
    x->size = data.len;
    x->blksize = blksize;
    x->window = window;
    x->retries_max = retries;
    x->nblocks = (int64_t)(data.len / blksize) + 1;
    x->timeout = timeout;
    x->stall_max = stall_max;
    pthread_mutex_lock(&p->lock);
    x->next = p->pending;
    p->pending = x;
    pthread_mutex_unlock(&p->lock);
    wake(p);
    Py_RETURN_NONE;
}

static PyObject *Pump_abort(Pump *p, PyObject *args)
{
    long long id;
    const char *reason;
    if (!PyArg_ParseTuple(args, "Ls", &id, &reason))
        return NULL;
    struct abort_req *a = calloc(1, sizeof *a);
    if (a == NULL)
        return PyErr_NoMemory();
    a->id = id;
    snprintf(a->reason, sizeof a->reason, "%s", reason);
    pthread_mutex_lock(&p->lock);
    a->next = p->aborts;
    p->aborts = a;
    pthread_mutex_unlock(&p->lock);
    wake(p);
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *p, PyObject *noargs)
{
    pthread_mutex_lock(&p->lock);
    p->stop_requested = 1;
    pthread_mutex_unlock(&p->lock);
    wake(p);
    Py_RETURN_NONE;
}

static PyObject *Pump_serve(Pump *p, PyObject *noargs)
{
    if (p->serving) {
        PyErr_SetString(PyExc_RuntimeError, "serve() is already running in another thread");
        return NULL;
    }
    p->serving = 1;
    Py_INCREF(p);
    Py_BEGIN_ALLOW_THREADS
    loop(p);
    Py_END_ALLOW_THREADS
    p->serving = 0;
    PyObject *out = NULL;
    if (p->done == NULL && p->nprogress == 0) { /* stopped, and everything reported */
        out = Py_None;
        Py_INCREF(out);
        goto end;
    }
    out = PyList_New(0);
    if (out == NULL)
        goto end;
    for (int i = 0; i < p->nprogress; i++) {
        PyObject *t = Py_BuildValue("(sL)", "progress", p->progress[i]);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            goto end;
        }
        Py_DECREF(t);
    }
    p->nprogress = 0;
    /* newest first on the list: report in the order they ended */
    struct xfer *ordered = NULL;
    while (p->done) {
        struct xfer *next = p->done->next;
        p->done->next = ordered;
        ordered = p->done;
        p->done = next;
    }
    while (ordered) {
        struct xfer *x = ordered;
        ordered = x->next;
        if (out != NULL) {
            /* A client's ERROR text is whatever bytes it sent: decode leniently. */
            PyObject *reason = PyUnicode_DecodeUTF8(x->reason, (Py_ssize_t)strlen(x->reason),
                                                    "replace");
            PyObject *t = reason == NULL ? NULL : Py_BuildValue(
                "(sLsNLLLLd)", "done", x->id, x->outcome, reason, (long long)x->acked,
                x->payload_sent, x->packets_sent, x->malformed, x->started);
            if (t == NULL || PyList_Append(out, t) < 0)
                Py_CLEAR(out);
            Py_XDECREF(t);
        }
        free_xfer(x);
    }
end:
    Py_DECREF(p);
    return out;
}

static PyObject *Pump_stopped(Pump *p, void *closure)
{
    return PyBool_FromLong(p->stopped);
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)Pump_add, METH_VARARGS,
     "add(id, sock_fd, stranger_fd, data, blksize, windowsize, timeout, retries, oack, "
     "stall_max): hand a transfer to this pump (thread-safe); it owns both descriptors."},
    {"abort", (PyCFunction)Pump_abort, METH_VARARGS,
     "abort(id, reason): end that transfer with ERROR 0 <reason> (thread-safe)."},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS,
     "stop(): end every transfer with ERROR 0 \"server stopping\" (thread-safe)."},
    {"serve", (PyCFunction)Pump_serve, METH_NOARGS,
     "serve() -> list | None: run the block loop with the GIL released until there is "
     "something to report (see the module source); None once stopped and drained."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pump_getset[] = {
    {"stopped", (getter)Pump_stopped, NULL, "stop() was seen by the serving thread", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netbootd.tftp._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One thread's block loop over a set of TFTP transfers (see _pump.c).",
    .tp_new = Pump_new,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netbootd.tftp._pump",
    "The TFTP block loop in C, run with the GIL released (see _pump.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__pump(void)
{
    if (PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
