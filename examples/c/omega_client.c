/*
 * omega_client: a minimal C client of `omega-brain serve --socket PATH`.
 *
 * Sends init (an offline brain in RAM, with an optional .npz catalog), observe, recommend,
 * stats and shutdown as newline-delimited JSON over a Unix domain socket and prints every
 * reply as "<op>: <reply>". POSIX sockets and the C library only; no JSON library: requests
 * are formatted with escaping, replies are printed as received and only their "ok" member
 * is looked at.
 *
 * Build: cc -std=c99 -Wall -Wextra -Werror -O2 -o omega_client omega_client.c
 * Usage: omega_client SOCKET_PATH [CATALOG_NPZ [CONTENT_ID]]
 * Exit:  0 every reply ok; 1 usage, connection or I/O error; 2 an error reply (after which
 *        the brain is shut down if init had succeeded).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPLY_BYTES (4u << 20) /* a recommend reply with k = 1000 stays far below */

struct conn {
    int fd;
    char *buf;  /* bytes received and not yet returned */
    size_t len; /* valid bytes in buf */
    size_t cap;
};

/* Append `s` to `out` (size `cap`) as a JSON string body; returns 0, or -1 if it does not fit. */
static int json_escape(char *out, size_t cap, const char *s) {
    size_t n = 0;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        char tmp[8];
        int w;
        if (c == '"' || c == '\\') {
            w = snprintf(tmp, sizeof tmp, "\\%c", c);
        } else if (c < 0x20) {
            w = snprintf(tmp, sizeof tmp, "\\u%04x", c);
        } else {
            tmp[0] = (char)c;
            tmp[1] = '\0';
            w = 1;
        }
        if (n + (size_t)w + 1 > cap) {
            return -1;
        }
        memcpy(out + n, tmp, (size_t)w);
        n += (size_t)w;
    }
    out[n] = '\0';
    return 0;
}

static int send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t w = write(fd, data, len);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        data += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Read one reply line (without its newline) into a malloc'd string; NULL on EOF or error. */
static char *read_line(struct conn *c) {
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl != NULL) {
            size_t line_len = (size_t)(nl - c->buf);
            char *line = malloc(line_len + 1);
            if (line == NULL) {
                return NULL;
            }
            memcpy(line, c->buf, line_len);
            line[line_len] = '\0';
            memmove(c->buf, nl + 1, c->len - line_len - 1);
            c->len -= line_len + 1;
            return line;
        }
        if (c->len == c->cap) {
            size_t cap = c->cap ? c->cap * 2 : 4096;
            char *grown;
            if (cap > MAX_REPLY_BYTES) {
                fprintf(stderr, "omega_client: reply longer than %u bytes\n", MAX_REPLY_BYTES);
                return NULL;
            }
            grown = realloc(c->buf, cap);
            if (grown == NULL) {
                return NULL;
            }
            c->buf = grown;
            c->cap = cap;
        }
        {
            ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
            if (r < 0 && errno == EINTR) {
                continue;
            }
            if (r <= 0) {
                fprintf(stderr, "omega_client: %s\n", r == 0 ? "server closed the connection"
                                                             : strerror(errno));
                return NULL;
            }
            c->len += (size_t)r;
        }
    }
}

/* 1 when the reply's "ok" member is true, else 0 (error reply or not understood). */
static int reply_ok(const char *reply) {
    const char *p = strstr(reply, "\"ok\"");
    if (p == NULL) {
        return 0;
    }
    p += 4;
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    if (*p++ != ':') {
        return 0;
    }
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    return strncmp(p, "true", 4) == 0;
}

/* Send one request line and print "<op>: <reply>"; returns 1 ok, 0 error reply, -1 I/O error. */
static int call(struct conn *c, const char *op, const char *request) {
    char *reply;
    int ok;
    if (send_all(c->fd, request, strlen(request)) != 0 || send_all(c->fd, "\n", 1) != 0) {
        fprintf(stderr, "omega_client: send: %s\n", strerror(errno));
        return -1;
    }
    reply = read_line(c);
    if (reply == NULL) {
        return -1;
    }
    printf("%s: %s\n", op, reply);
    fflush(stdout);
    ok = reply_ok(reply);
    free(reply);
    return ok;
}

int main(int argc, char **argv) {
    static const char shutdown_req[] = "{\"op\": \"shutdown\"}";
    struct sockaddr_un addr;
    struct sigaction ignore;
    struct conn c = {-1, NULL, 0, 0};
    char catalog[2048] = "";
    char content_id[512] = "item-0";
    char init_req[4096];
    char observe_req[1024];
    struct {
        const char *op;
        const char *request;
    } steps[5];
    int status = 0;
    int i;

    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: %s SOCKET_PATH [CATALOG_NPZ [CONTENT_ID]]\n", argv[0]);
        return 1;
    }
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "omega_client: socket path too long\n");
        return 1;
    }
    if ((argc > 2 && json_escape(catalog, sizeof catalog, argv[2]) != 0) ||
        (argc > 3 && json_escape(content_id, sizeof content_id, argv[3]) != 0)) {
        fprintf(stderr, "omega_client: argument too long\n");
        return 1;
    }
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN; /* a closed server is an error return, not a signal */
    sigaction(SIGPIPE, &ignore, NULL);

    /* An offline brain in RAM; the catalog (if any) comes from the .npz file. */
    snprintf(init_req, sizeof init_req,
             "{\"op\": \"init\", \"device_id\": \"c-client\", \"store_path\": \":memory:\"%s%s%s}",
             argc > 2 ? ", \"catalog_file\": \"" : "", catalog, argc > 2 ? "\"" : "");
    snprintf(observe_req, sizeof observe_req,
             "{\"op\": \"observe\", \"content_id\": \"%s\", \"started_at_ms\": %lld, "
             "\"completion\": 0.95, \"watch_seconds\": 1800}",
             content_id, (long long)time(NULL) * 1000LL);
    steps[0].op = "init";
    steps[0].request = init_req;
    steps[1].op = "observe";
    steps[1].request = observe_req;
    steps[2].op = "recommend";
    steps[2].request = "{\"op\": \"recommend\", \"k\": 5}";
    steps[3].op = "stats";
    steps[3].request = "{\"op\": \"stats\"}";
    steps[4].op = "shutdown";
    steps[4].request = shutdown_req;

    c.fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c.fd < 0) {
        perror("omega_client: socket");
        return 1;
    }
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, argv[1], strlen(argv[1]) + 1);
    if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("omega_client: connect");
        close(c.fd);
        return 1;
    }

    for (i = 0; i < 5; i++) {
        int r = call(&c, steps[i].op, steps[i].request);
        if (r < 0) {
            status = 1;
            break;
        }
        if (r == 0) {
            fprintf(stderr, "omega_client: %s failed\n", steps[i].op);
            status = 2;
            if (i > 0 && i < 4) { /* init had succeeded: still close the brain */
                (void)call(&c, "shutdown", shutdown_req);
            }
            break;
        }
    }
    free(c.buf);
    close(c.fd);
    return status;
}
