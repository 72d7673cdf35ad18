/* One small write into every chunk of a range, in a random order, at a fixed queue depth: the
 * workload where every write after a snapshot copies a chunk (issue 9, target 2). fio cannot do it
 * (its random map is turned off by blockalign, so offsets repeat). Built by the scripts that use it:
 *
 *   cc -O2 -o chunk-writes Scripts/bench/chunk-writes.c -lnbd
 *   chunk-writes URI OFFSET LENGTH CHUNK WRITE-SIZE QUEUE-DEPTH SEED
 *
 * Prints one JSON object: writes, seconds, iops, MiBps (of the bytes written), p99ms.
 */
#include <inttypes.h>
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s URI OFFSET LENGTH CHUNK WRITE-SIZE QUEUE-DEPTH SEED\n", argv[0]);
        return 2;
    }
    const char *uri = argv[1];
    uint64_t offset = strtoull(argv[2], NULL, 0), length = strtoull(argv[3], NULL, 0);
    uint64_t chunk = strtoull(argv[4], NULL, 0), size = strtoull(argv[5], NULL, 0);
    int depth = atoi(argv[6]);
    unsigned seed = (unsigned)strtoul(argv[7], NULL, 0);
    if (chunk == 0 || size == 0 || size > chunk || depth < 1 || depth > 1024) {
        fprintf(stderr, "chunk-writes: bad arguments\n");
        return 2;
    }
    uint64_t count = length / chunk;
    uint64_t *offsets = malloc(count * sizeof *offsets);
    double *started = calloc(count, sizeof *started), *latency = calloc(count, sizeof *latency);
    int64_t *cookies = calloc(count, sizeof *cookies);
    char *buffer = malloc(size);
    if (!offsets || !started || !latency || !cookies || !buffer) return 1;
    srand(seed);
    for (uint64_t i = 0; i < count; i++) offsets[i] = offset + i * chunk;
    for (uint64_t i = count - 1; i > 0; i--) { /* Fisher-Yates */
        uint64_t j = ((uint64_t)rand() << 31 ^ (uint64_t)rand()) % (i + 1);
        uint64_t t = offsets[i];
        offsets[i] = offsets[j];
        offsets[j] = t;
    }
    for (uint64_t i = 0; i < size; i++) buffer[i] = (char)(rand() & 0xff);

    struct nbd_handle *nbd = nbd_create();
    if (!nbd || nbd_connect_uri(nbd, uri) == -1) {
        fprintf(stderr, "chunk-writes: %s\n", nbd_get_error());
        return 1;
    }
    uint64_t next = 0, done = 0;
    int inflight = 0;
    double start = now();
    while (done < count) {
        while (inflight < depth && next < count) {
            int64_t cookie = nbd_aio_pwrite(nbd, buffer, size, offsets[next], NBD_NULL_COMPLETION, 0);
            if (cookie == -1) {
                fprintf(stderr, "chunk-writes: %s\n", nbd_get_error());
                return 1;
            }
            cookies[next] = cookie;
            started[next] = now();
            next++;
            inflight++;
        }
        if (nbd_poll(nbd, -1) == -1) {
            fprintf(stderr, "chunk-writes: %s\n", nbd_get_error());
            return 1;
        }
        int64_t cookie;
        while ((cookie = nbd_aio_peek_command_completed(nbd)) > 0) {
            if (nbd_aio_command_completed(nbd, cookie) == -1) {
                fprintf(stderr, "chunk-writes: write failed: %s\n", nbd_get_error());
                return 1;
            }
            /* Cookies are handed out in order from 1 on this handle. */
            uint64_t index = (uint64_t)(cookie - cookies[0]);
            latency[index] = now() - started[index];
            inflight--;
            done++;
        }
    }
    double seconds = now() - start;
    nbd_shutdown(nbd, 0);
    nbd_close(nbd);
    qsort(latency, count, sizeof *latency, compare);
    printf("{\"writes\": %" PRIu64 ", \"seconds\": %.6f, \"iops\": %.1f, \"MiBps\": %.2f, \"p99ms\": %.3f}\n", count,
           seconds, count / seconds, count * (double)size / seconds / 1048576.0,
           latency[(uint64_t)((count - 1) * 0.99)] * 1000.0);
    return 0;
}
