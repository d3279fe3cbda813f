/*
 * xsm-verifier: the in-guest verifier of the xsm-driver guest kit.
 *
 * Licensed under the Apache License, Version 2.0.
 *
 * Runs as PID 1 of the guest kit's initramfs (tools/guest-kit/init execs
 * it).  For every virtio disk (/sys/block/vd*) it writes generation-stamped
 * 4 KiB blocks with O_DIRECT at a steady rate, keeps what it wrote -- one
 * generation byte per block -- in guest memory (the model), reads blocks
 * back and checks them against the model.  A block holds a pure function
 * of (disk, block, generation), so a write lost, torn or reordered
 * anywhere under the guest shows as a mismatch.  Generation 0 means "never
 * written by this boot": such blocks are not checked.
 *
 * Everything it says goes to the console (stdout), one parseable line per
 * report, each line starting with "XSMV ":
 *
 *   XSMV start disks=2 blocks=16384,16384 rate=50 reads=1 ...
 *   XSMV progress t_ms=.. writes=.. reads=.. mismatches=.. io_errors=..
 *        max_stall_ms=.. last_stall_ms=.. max_wall_stall_ms=..
 *        wall_synced=0|1 writing=0|1 win_writes=..
 *        win_max_stall_ms=.. win_max_wall_stall_ms=..
 *        lat_p50_us=.. lat_p99_us=.. lat_max_us=..              (one line)
 *   XSMV mismatch disk=0 block=12 expected=gen:5 found=gen:4
 *   XSMV verify id=1 result=ok blocks=.. checked=.. unwritten=..
 *        mismatches=0 io_errors=0 ms=..                          (one line)
 *   XSMV adopt result=ok blocks=.. written=.. mismatches=0 io_errors=0
 *        model=.. ms=..                     (xsmv.adopt=1, one line)
 *   XSMV shutdown writes=.. mismatches=.. io_errors=.. flush_errors=0
 *        written=.. model=..  (the last line: ACPI power button or the
 *                              poweroff command; then the guest powers off)
 *
 * Power-off: the kernel's ACPI "button" driver (a module of Debian's cloud
 * kernel, loaded by /init with "evdev") turns QEMU's system_powerdown into
 * a KEY_POWER event on /dev/input/event*, which the main loop polls. The
 * verifier then flushes every disk (each write already completed, O_DIRECT
 * and synchronous; fsync sends the device a FLUSH), prints the shutdown
 * line, waits for the console to send it, and calls reboot(RB_POWER_OFF):
 * QEMU exits. model= is a digest (FNV-1a 64) of the model, every block's
 * generation on every disk; written= counts the blocks written.
 *
 * Adoption (xsmv.adopt=1): before the first write the verifier reads every
 * disk and takes what it finds as its model: a block of zeros is
 * unwritten, a block that is exactly the stamp of (disk, block, gen) has
 * generation gen, anything else is a mismatch. Its adopt line's model= and
 * written= then equal the shutdown line's of the boot before when the
 * disks hold every write that boot made, and nothing else; later verifies
 * check the adopted blocks too.
 *
 * Stalls: max_stall_ms is the longest gap between two completed writes in
 * the guest's own clock (CLOCK_MONOTONIC), which stands still while QEMU
 * has the VM stopped; max_wall_stall_ms measures the same gap on a clock
 * that follows the CMOS RTC (QEMU's default rtc clock=host keeps running
 * while the VM is stopped), so a pause of the whole VM shows there, at a
 * resolution of about one second. It counts only once that clock is
 * synced (wall_synced=1 in the progress lines), on the first second
 * edge of the RTC after the first write, within a second of the start.
 *
 * The window: the win_* and lat_* fields cover the writes since the
 * start or the last "mark" command. win_max_stall_ms and
 * win_max_wall_stall_ms are the two stalls above within the window;
 * lat_p50_us, lat_p99_us and lat_max_us are the latency of one write
 * (the pwrite call, CLOCK_MONOTONIC) in microseconds: the max exact, the
 * percentiles from a histogram of 32 buckets per power of two (the
 * middle of the bucket, within 1.6%; exact below 64 us); -1 when the
 * window has no write.
 *
 * Options, on the kernel command line:
 *   xsmv.rate=N        writes per second per disk (default 50; 0: no
 *                      writes, only reports and commands)
 *   xsmv.reads=N       reads back per write (default 1)
 *   xsmv.report_ms=N   progress line period (default 1000)
 *   xsmv.blocks=N      use only the first N blocks of each disk
 *   xsmv.verify_at=N   verify every disk once when N writes are done
 *   xsmv.ctl=PATH      command channel (default /dev/ttyS1)
 *   xsmv.adopt=1       take what the disks hold as the model at the start
 *
 * Commands, one per line on the command channel (the second serial port,
 * which the qemu driver connects to a unix socket ctl.sock):
 *   verify   verify the whole of every disk and print one summary line
 *   status   print a progress line now
 *   stop     stop writing (reports go on);  start  write again
 *   rate N   change the write rate
 *   mark     start a new window (win_* and lat_* fields), print a
 *            progress line
 *   poweroff as the ACPI power button: flush, shutdown line, power off
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <linux/rtc.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_DISKS 16
#define MAX_INPUTS 8
#define MAX_MISMATCH_LINES 20
#define CHUNK (256 * BLOCK)

struct disk {
    char name[32];
    int fd;
    uint64_t blocks;
    uint8_t *gen;             /* the model: generation per block */
    uint64_t written;         /* blocks with generation != 0 */
};

static struct disk disks[MAX_DISKS];
static int ndisks;
static long rate = 50, reads_per_write = 1, report_ms = 1000;
static uint64_t limit_blocks, verify_at;
static char ctl_path[128] = "/dev/ttyS1";
static int writing = 1;
static uint64_t writes, reads, mismatches, io_errors, verifies;
static int64_t max_stall_ms, last_stall_ms, max_wall_stall_ms;
static int64_t last_write_ms = -1, last_write_wall_ms = -1;
static unsigned long mismatch_lines;
static int rtc_fd = -1;
static int adopt;
static int64_t wall_offset_ms;
static int wall_readings, wall_synced;   /* synced: on a second edge */
static uint8_t *buf, *chunk;
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

/* the window (since the start or the last "mark"): stalls and write
 * latency; LAT_SUB buckets per power of two of microseconds */
#define LAT_SUB_BITS 5
#define LAT_SUB (1 << LAT_SUB_BITS)
#define LAT_EXACT (2 * LAT_SUB)
#define LAT_BUCKETS (LAT_EXACT + (64 - LAT_SUB_BITS - 1) * LAT_SUB)
static uint64_t win_writes;
static int64_t win_max_stall_ms, win_max_wall_stall_ms, win_lat_max_us;
static uint32_t win_lat[LAT_BUCKETS];

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    /* one write per line, so kernel messages cannot split it */
    if (write(1, line, n) < 0)
        (void)0;
}

static int64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Latency histogram: exact below LAT_EXACT us, then LAT_SUB buckets per
 * power of two. */
static int lat_bucket(uint64_t us)
{
    int e;

    if (us < LAT_EXACT)
        return (int)us;
    e = 63 - __builtin_clzll(us);            /* us in [2^e, 2^(e+1)) */
    return LAT_EXACT + (e - LAT_SUB_BITS - 1) * LAT_SUB +
           (int)((us >> (e - LAT_SUB_BITS)) & (LAT_SUB - 1));
}

/* The middle of bucket i, in us. */
static int64_t lat_value(int i)
{
    int e, sub;
    int64_t low, width;

    if (i < LAT_EXACT)
        return i;
    e = (i - LAT_EXACT) / LAT_SUB + LAT_SUB_BITS + 1;
    sub = (i - LAT_EXACT) % LAT_SUB;
    width = (int64_t)1 << (e - LAT_SUB_BITS);
    low = ((int64_t)1 << e) + sub * width;
    return low + width / 2;
}

/* The p-th percentile (nearest rank) of the window's latencies, or -1. */
static int64_t lat_percentile(int p)
{
    uint64_t rank, cum = 0;
    int i;

    if (!win_writes)
        return -1;
    rank = (win_writes * p + 99) / 100;
    if (!rank)
        rank = 1;
    for (i = 0; i < LAT_BUCKETS; i++) {
        cum += win_lat[i];
        if (cum >= rank)      /* (the middle of the max's bucket: above) */
            return lat_value(i) < win_lat_max_us ? lat_value(i)
                                                 : win_lat_max_us;
    }
    return win_lat_max_us;
}

static void window_reset(void)
{
    win_writes = 0;
    win_max_stall_ms = win_max_wall_stall_ms = 0;
    win_lat_max_us = -1;
    memset(win_lat, 0, sizeof(win_lat));
}

/* A clock that runs with CLOCK_MONOTONIC but never falls more than a
 * second behind the RTC: it jumps forward after the VM was stopped. */
static int64_t wall_ms(void)
{
    struct rtc_time t;
    struct tm tm;
    int64_t now = mono_ms(), rtc;

    if (rtc_fd < 0 || ioctl(rtc_fd, RTC_RD_TIME, &t) < 0)
        return now;
    memset(&tm, 0, sizeof(tm));
    tm.tm_sec = t.tm_sec;
    tm.tm_min = t.tm_min;
    tm.tm_hour = t.tm_hour;
    tm.tm_mday = t.tm_mday;
    tm.tm_mon = t.tm_mon;
    tm.tm_year = t.tm_year;
    rtc = (int64_t)timegm(&tm) * 1000;
    if (!wall_readings++) {
        wall_offset_ms = rtc - now;       /* within a second behind */
    } else if (now + wall_offset_ms < rtc) {   /* behind: jump */
        wall_offset_ms = rtc - now;
        wall_synced = 1;
    }
    else if (now + wall_offset_ms > rtc + 1000)   /* ahead: slow down */
        wall_offset_ms = rtc + 999 - now;
    return now + wall_offset_ms;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rnd(uint64_t n)
{
    return n ? splitmix(&rng_state) % n : 0;
}

/* The 4 KiB of (disk, block, generation). */
static void pattern(uint8_t *out, int disk, uint64_t block, unsigned gen)
{
    uint64_t s = ((uint64_t)disk << 56) ^ (block << 8) ^ gen;
    uint64_t *w = (uint64_t *)out;
    int i;

    memcpy(out, "XSMVBLK1", 8);
    w[1] = (uint64_t)disk | ((uint64_t)gen << 32);
    w[2] = block;
    for (i = 3; i < BLOCK / 8; i++)
        w[i] = splitmix(&s);
}

static void describe(char *out, size_t len, const uint8_t *data, int disk)
{
    const uint64_t *w = (const uint64_t *)data;
    int i;

    for (i = 0; i < BLOCK && !data[i]; i++)
        ;
    if (i == BLOCK)
        snprintf(out, len, "zeros");
    else if (memcmp(data, "XSMVBLK1", 8))
        snprintf(out, len, "foreign");
    else if ((int)(w[1] & 0xffffffff) != disk)
        snprintf(out, len, "disk:%u,block:%llu,gen:%u",
                 (unsigned)(w[1] & 0xffffffff), (unsigned long long)w[2],
                 (unsigned)(w[1] >> 32));
    else
        snprintf(out, len, "block:%llu,gen:%u", (unsigned long long)w[2],
                 (unsigned)(w[1] >> 32));
}

/* 0 when data is what the model says block holds, 1 (and a line) if not. */
static int check(int d, uint64_t block, const uint8_t *data)
{
    static uint8_t expected[BLOCK] __attribute__((aligned(64)));
    unsigned gen = disks[d].gen[block];
    char found[96];

    if (!gen)
        return 0;
    pattern(expected, d, block, gen);
    if (!memcmp(expected, data, BLOCK))
        return 0;
    mismatches++;
    if (mismatch_lines++ < MAX_MISMATCH_LINES) {
        describe(found, sizeof(found), data, d);
        say("XSMV mismatch disk=%d dev=%s block=%llu expected=gen:%u "
            "found=%s", d, disks[d].name, (unsigned long long)block, gen,
            found);
    }
    return 1;
}

static void progress(const char *what)
{
    say("XSMV %s t_ms=%lld writes=%llu reads=%llu mismatches=%llu "
        "io_errors=%llu max_stall_ms=%lld last_stall_ms=%lld "
        "max_wall_stall_ms=%lld wall_synced=%d writing=%d win_writes=%llu "
        "win_max_stall_ms=%lld win_max_wall_stall_ms=%lld lat_p50_us=%lld "
        "lat_p99_us=%lld lat_max_us=%lld", what,
        (long long)mono_ms(),
        (unsigned long long)writes, (unsigned long long)reads,
        (unsigned long long)mismatches, (unsigned long long)io_errors,
        (long long)max_stall_ms, (long long)last_stall_ms,
        (long long)max_wall_stall_ms, wall_synced, writing && rate > 0,
        (unsigned long long)win_writes, (long long)win_max_stall_ms,
        (long long)win_max_wall_stall_ms, (long long)lat_percentile(50),
        (long long)lat_percentile(99), (long long)win_lat_max_us);
}

static void io_error(const char *op, int d, uint64_t block, ssize_t n)
{
    io_errors++;
    if (io_errors <= MAX_MISMATCH_LINES)
        say("XSMV io_error op=%s disk=%d dev=%s block=%llu ret=%zd "
            "errno=%d", op, d, disks[d].name, (unsigned long long)block,
            n, n < 0 ? errno : 0);
}

static void write_one(int d)
{
    struct disk *k = &disks[d];
    uint64_t block = rnd(k->blocks);
    unsigned gen = k->gen[block] % 255 + 1;
    int64_t now, wall, t0, lat;
    int was_synced = wall_synced;
    ssize_t n;

    pattern(buf, d, block, gen);
    t0 = mono_us();
    n = pwrite(k->fd, buf, BLOCK, (off_t)(block * BLOCK));
    lat = mono_us() - t0;
    if (n != BLOCK) {
        io_error("write", d, block, n);
        return;
    }
    if (!k->gen[block])
        k->written++;
    k->gen[block] = gen;
    writes++;
    win_writes++;
    win_lat[lat_bucket(lat < 0 ? 0 : (uint64_t)lat)]++;
    if (lat > win_lat_max_us)
        win_lat_max_us = lat;
    now = mono_ms();
    wall = wall_ms();
    if (last_write_ms >= 0) {
        last_stall_ms = now - last_write_ms;
        if (last_stall_ms > max_stall_ms)
            max_stall_ms = last_stall_ms;
        if (last_stall_ms > win_max_stall_ms)
            win_max_stall_ms = last_stall_ms;
        if (was_synced && wall - last_write_wall_ms > max_wall_stall_ms)
            max_wall_stall_ms = wall - last_write_wall_ms;
        if (was_synced && wall - last_write_wall_ms > win_max_wall_stall_ms)
            win_max_wall_stall_ms = wall - last_write_wall_ms;
    }
    last_write_ms = now;
    last_write_wall_ms = wall;
}

static void read_one(int d)
{
    struct disk *k = &disks[d];
    uint64_t block;
    ssize_t n;
    int tries;

    if (!k->written)
        return;
    for (tries = 0; tries < 64; tries++) {   /* prefer written blocks */
        block = rnd(k->blocks);
        if (k->gen[block])
            break;
    }
    n = pread(k->fd, buf, BLOCK, (off_t)(block * BLOCK));
    if (n != BLOCK) {
        io_error("read", d, block, n);
        return;
    }
    reads++;
    check(d, block, buf);
}

static void verify_all(void)
{
    uint64_t checked = 0, unwritten = 0, total = 0, before_mm = mismatches;
    uint64_t before_io = io_errors, at, b, nb;
    int64_t t0 = mono_ms();
    int d;

    verifies++;
    for (d = 0; d < ndisks; d++) {
        struct disk *k = &disks[d];

        for (at = 0; at < k->blocks; at += nb) {
            ssize_t n;

            nb = k->blocks - at < CHUNK / BLOCK ? k->blocks - at
                                                : CHUNK / BLOCK;
            n = pread(k->fd, chunk, nb * BLOCK, (off_t)(at * BLOCK));
            if (n != (ssize_t)(nb * BLOCK)) {
                io_error("verify", d, at, n);
                continue;
            }
            for (b = 0; b < nb; b++) {
                if (!k->gen[at + b]) {
                    unwritten++;
                    continue;
                }
                checked++;
                check(d, at + b, chunk + b * BLOCK);
            }
        }
        total += k->blocks;
    }
    say("XSMV verify id=%llu result=%s disks=%d blocks=%llu checked=%llu "
        "unwritten=%llu mismatches=%llu io_errors=%llu ms=%lld",
        (unsigned long long)verifies,
        mismatches == before_mm && io_errors == before_io ? "ok" : "FAIL",
        ndisks, (unsigned long long)total, (unsigned long long)checked,
        (unsigned long long)unwritten,
        (unsigned long long)(mismatches - before_mm),
        (unsigned long long)(io_errors - before_io),
        (long long)(mono_ms() - t0));
}

static void parse_cmdline(void)
{
    char line[4096], *tok, *save;
    FILE *f = fopen("/proc/cmdline", "r");

    if (!f)
        return;
    if (!fgets(line, sizeof(line), f))
        line[0] = 0;
    fclose(f);
    for (tok = strtok_r(line, " \n", &save); tok;
         tok = strtok_r(NULL, " \n", &save)) {
        if (!strncmp(tok, "xsmv.rate=", 10))
            rate = atol(tok + 10);
        else if (!strncmp(tok, "xsmv.reads=", 11))
            reads_per_write = atol(tok + 11);
        else if (!strncmp(tok, "xsmv.report_ms=", 15))
            report_ms = atol(tok + 15);
        else if (!strncmp(tok, "xsmv.blocks=", 12))
            limit_blocks = strtoull(tok + 12, NULL, 10);
        else if (!strncmp(tok, "xsmv.verify_at=", 15))
            verify_at = strtoull(tok + 15, NULL, 10);
        else if (!strncmp(tok, "xsmv.adopt=", 11))
            adopt = atoi(tok + 11);
        else if (!strncmp(tok, "xsmv.ctl=", 9))
            snprintf(ctl_path, sizeof(ctl_path), "%s", tok + 9);
    }
    if (report_ms < 50)
        report_ms = 50;
}

static int cmp_names(const void *a, const void *b)
{
    const struct disk *x = a, *y = b;
    size_t lx = strlen(x->name), ly = strlen(y->name);

    return lx != ly ? (int)lx - (int)ly : strcmp(x->name, y->name);
}

static void find_disks(void)
{
    int64_t deadline = mono_ms() + 10000;
    DIR *dir;
    struct dirent *e;
    int d;

    /* virtio_blk probes asynchronously: wait for the first disk */
    for (;;) {
        ndisks = 0;
        dir = opendir("/sys/block");
        while (dir && (e = readdir(dir)) && ndisks < MAX_DISKS)
            if (!strncmp(e->d_name, "vd", 2))
                snprintf(disks[ndisks++].name, sizeof(disks[0].name),
                         "%.31s", e->d_name);
        if (dir)
            closedir(dir);
        if (ndisks || mono_ms() > deadline)
            break;
        usleep(50000);
    }
    usleep(100000);          /* let the other disks of the batch appear */
    ndisks = 0;
    dir = opendir("/sys/block");
    while (dir && (e = readdir(dir)) && ndisks < MAX_DISKS)
        if (!strncmp(e->d_name, "vd", 2))
            snprintf(disks[ndisks++].name, sizeof(disks[0].name), "%.31s",
                     e->d_name);
    if (dir)
        closedir(dir);
    qsort(disks, ndisks, sizeof(disks[0]), cmp_names);
    for (d = 0; d < ndisks; d++) {
        char path[64];
        uint64_t size = 0;
        struct disk *k = &disks[d];

        snprintf(path, sizeof(path), "/dev/%.31s", k->name);
        k->fd = open(path, O_RDWR | O_DIRECT);
        if (k->fd < 0 || ioctl(k->fd, BLKGETSIZE64, &size) < 0) {
            say("XSMV fatal cannot open %s errno=%d", path, errno);
            k->blocks = 0;
            continue;
        }
        k->blocks = size / BLOCK;
        if (limit_blocks && k->blocks > limit_blocks)
            k->blocks = limit_blocks;
        k->gen = calloc(k->blocks ? k->blocks : 1, 1);
    }
}

/* FNV-1a 64 of every disk's block count and model. */
static uint64_t model_digest(void)
{
    uint64_t h = 0xcbf29ce484222325ULL, b;
    int d, i;

    for (d = 0; d < ndisks; d++) {
        for (i = 0; i < 8; i++) {
            h ^= (disks[d].blocks >> (8 * i)) & 0xff;
            h *= 0x100000001b3ULL;
        }
        for (b = 0; b < disks[d].blocks; b++) {
            h ^= disks[d].gen[b];
            h *= 0x100000001b3ULL;
        }
    }
    return h;
}

static uint64_t written_blocks(void)
{
    uint64_t n = 0;
    int d;

    for (d = 0; d < ndisks; d++)
        n += disks[d].written;
    return n;
}

/* The generation of block b of disk d as data holds it, or -1 when data
 * is neither zeros nor exactly a stamp of (d, b, gen). */
static int stamp_gen(int d, uint64_t b, const uint8_t *data)
{
    static uint8_t expected[BLOCK] __attribute__((aligned(64)));
    const uint64_t *w = (const uint64_t *)data;
    unsigned gen;
    int i;

    if (memcmp(data, "XSMVBLK1", 8)) {
        for (i = 0; i < BLOCK && !data[i]; i++)
            ;
        return i == BLOCK ? 0 : -1;
    }
    gen = (unsigned)(w[1] >> 32);
    if ((int)(w[1] & 0xffffffff) != d || w[2] != b || gen < 1 || gen > 255)
        return -1;
    pattern(expected, d, b, gen);
    return memcmp(expected, data, BLOCK) ? -1 : (int)gen;
}

/* xsmv.adopt=1: the model is what the disks hold. */
static void adopt_all(void)
{
    uint64_t before_mm = mismatches, before_io = io_errors, total = 0;
    uint64_t at, b, nb;
    int64_t t0 = mono_ms();
    char found[96];
    int d, gen;

    for (d = 0; d < ndisks; d++) {
        struct disk *k = &disks[d];

        for (at = 0; at < k->blocks; at += nb) {
            ssize_t n;

            nb = k->blocks - at < CHUNK / BLOCK ? k->blocks - at
                                                : CHUNK / BLOCK;
            n = pread(k->fd, chunk, nb * BLOCK, (off_t)(at * BLOCK));
            if (n != (ssize_t)(nb * BLOCK)) {
                io_error("adopt", d, at, n);
                continue;
            }
            for (b = 0; b < nb; b++) {
                gen = stamp_gen(d, at + b, chunk + b * BLOCK);
                if (gen < 0) {
                    mismatches++;
                    if (mismatch_lines++ < MAX_MISMATCH_LINES) {
                        describe(found, sizeof(found), chunk + b * BLOCK, d);
                        say("XSMV mismatch disk=%d dev=%s block=%llu "
                            "expected=stamp found=%s", d, k->name,
                            (unsigned long long)(at + b), found);
                    }
                    continue;
                }
                k->gen[at + b] = (uint8_t)gen;
                if (gen)
                    k->written++;
            }
        }
        total += k->blocks;
    }
    say("XSMV adopt result=%s disks=%d blocks=%llu written=%llu "
        "mismatches=%llu io_errors=%llu model=%016llx ms=%lld",
        mismatches == before_mm && io_errors == before_io ? "ok" : "FAIL",
        ndisks, (unsigned long long)total,
        (unsigned long long)written_blocks(),
        (unsigned long long)(mismatches - before_mm),
        (unsigned long long)(io_errors - before_io),
        (unsigned long long)model_digest(), (long long)(mono_ms() - t0));
}

/* The ACPI power button (or the poweroff command): every write of the
 * verifier has completed (they are synchronous); flush the disks, say so
 * in one last line, let the console send it, power off. */
static void power_off(void)
{
    uint64_t flush_errors = 0;
    int d;

    progress("progress");
    for (d = 0; d < ndisks; d++)
        if (disks[d].fd >= 0 && fsync(disks[d].fd) < 0) {
            flush_errors++;
            say("XSMV io_error op=flush disk=%d dev=%s errno=%d", d,
                disks[d].name, errno);
        }
    sync();
    say("XSMV shutdown writes=%llu mismatches=%llu io_errors=%llu "
        "flush_errors=%llu written=%llu model=%016llx",
        (unsigned long long)writes, (unsigned long long)mismatches,
        (unsigned long long)io_errors, (unsigned long long)flush_errors,
        (unsigned long long)written_blocks(),
        (unsigned long long)model_digest());
    tcdrain(1);
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

static int open_inputs(struct pollfd *pfd, int max)
{
    char path[64];
    int i, n = 0, fd;

    for (i = 0; i < 32 && n < max; i++) {
        snprintf(path, sizeof(path), "/dev/input/event%d", i);
        fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd < 0)
            continue;
        pfd[n].fd = fd;
        pfd[n].events = POLLIN;
        n++;
    }
    return n;
}

static void command(char *line)
{
    char *nl = strchr(line, '\n');

    if (nl)
        *nl = 0;
    nl = strchr(line, '\r');
    if (nl)
        *nl = 0;
    if (!strcmp(line, "verify"))
        verify_all();
    else if (!strcmp(line, "status"))
        progress("progress");
    else if (!strcmp(line, "stop"))
        writing = 0, progress("progress");
    else if (!strcmp(line, "start"))
        writing = 1, last_write_ms = -1, progress("progress");
    else if (!strncmp(line, "rate ", 5))
        rate = atol(line + 5), last_write_ms = -1, progress("progress");
    else if (!strcmp(line, "mark"))
        window_reset(), progress("progress");
    else if (!strcmp(line, "poweroff"))
        power_off();
    else if (line[0])
        say("XSMV unknown_command %s", line);
}

int main(void)
{
    struct pollfd pfd[1 + MAX_INPUTS];
    int ninputs, ctl, d, i;
    char cbuf[256];
    size_t clen = 0;
    int64_t next_write, next_report, now;

    parse_cmdline();
    window_reset();
    rtc_fd = open("/dev/rtc0", O_RDONLY);
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) ||
        posix_memalign((void **)&chunk, BLOCK, CHUNK)) {
        say("XSMV fatal out of memory");
        for (;;)
            pause();
    }
    rng_state ^= (uint64_t)mono_ms() * 0x100000001b3ULL ^ (uint64_t)getpid();
    find_disks();
    ctl = open(ctl_path, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (ctl >= 0) {
        struct termios t;

        if (!tcgetattr(ctl, &t)) {
            cfmakeraw(&t);
            t.c_cc[VMIN] = 1;
            tcsetattr(ctl, TCSANOW, &t);
        }
    }
    pfd[0].fd = ctl;
    pfd[0].events = POLLIN;
    ninputs = open_inputs(pfd + 1, MAX_INPUTS);
    {
        char sizes[256] = "";
        size_t at = 0;

        for (d = 0; d < ndisks && at < sizeof(sizes) - 24; d++)
            at += snprintf(sizes + at, sizeof(sizes) - at, "%s%llu",
                           d ? "," : "",
                           (unsigned long long)disks[d].blocks);
        say("XSMV start disks=%d blocks=%s rate=%ld reads=%ld report_ms=%ld "
            "verify_at=%llu ctl=%s inputs=%d", ndisks, sizes, rate,
            reads_per_write, report_ms, (unsigned long long)verify_at,
            ctl >= 0 ? ctl_path : "none", ninputs);
    }
    if (adopt)
        adopt_all();               /* before the first write */
    now = mono_ms();
    next_write = now;
    next_report = now + report_ms;
    for (;;) {
        int timeout;

        now = mono_ms();
        if (writing && rate > 0 && ndisks && now >= next_write) {
            for (d = 0; d < ndisks; d++) {
                if (!disks[d].blocks)
                    continue;
                write_one(d);
                for (i = 0; i < reads_per_write; i++)
                    read_one(d);
            }
            next_write += 1000 / rate ? 1000 / rate : 1;
            now = mono_ms();
            if (next_write < now)      /* fell behind: no burst */
                next_write = now;
            if (verify_at && writes >= verify_at) {
                verify_at = 0;
                verify_all();
            }
        }
        if (now >= next_report) {
            progress("progress");
            next_report += report_ms;
            if (next_report < now)
                next_report = now + report_ms;
        }
        timeout = (int)(next_report - now);
        if (writing && rate > 0 && ndisks && next_write - now < timeout)
            timeout = (int)(next_write - now);
        if (timeout < 0)
            timeout = 0;
        if (poll(pfd, 1 + ninputs, timeout) <= 0)
            continue;
        if (ctl >= 0 && (pfd[0].revents & POLLIN)) {
            ssize_t n = read(ctl, cbuf + clen, sizeof(cbuf) - 1 - clen);
            char *nl;

            if (n > 0) {
                clen += n;
                cbuf[clen] = 0;
                while ((nl = strpbrk(cbuf, "\r\n"))) {
                    *nl = 0;
                    command(cbuf);
                    clen -= nl + 1 - cbuf;
                    memmove(cbuf, nl + 1, clen + 1);
                }
                if (clen == sizeof(cbuf) - 1)
                    clen = 0;       /* a line too long: drop it */
            }
        }
        for (i = 1; i <= ninputs; i++) {
            struct input_event ev;

            if (!(pfd[i].revents & POLLIN))
                continue;
            while (read(pfd[i].fd, &ev, sizeof(ev)) == sizeof(ev))
                if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value)
                    power_off();
        }
    }
}
