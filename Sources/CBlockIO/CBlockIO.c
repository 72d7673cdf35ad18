#define _GNU_SOURCE
#include "CBlockIO.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

int umbra_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int umbra_allocate(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, 0, offset, length);
}

int umbra_zero_range(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int umbra_block_device_size(int fd, uint64_t *size) {
    return ioctl(fd, BLKGETSIZE64, size);
}

int umbra_clone_range(int destination, int source, uint64_t source_offset, uint64_t length, uint64_t destination_offset) {
    struct file_clone_range range = {
        .src_fd = source, .src_offset = source_offset, .src_length = length, .dest_offset = destination_offset};
    return ioctl(destination, FICLONERANGE, &range);
}

int64_t umbra_seek_data(int fd, int64_t offset) {
    return lseek(fd, offset, SEEK_DATA);
}

int64_t umbra_seek_hole(int fd, int64_t offset) {
    return lseek(fd, offset, SEEK_HOLE);
}

ssize_t umbra_pread_nowait(int fd, void *buffer, size_t count, int64_t offset) {
    struct iovec vector = {.iov_base = buffer, .iov_len = count};
#ifdef RWF_NOWAIT
    return preadv2(fd, &vector, 1, offset, RWF_NOWAIT);
#else
    (void)vector;
    errno = EAGAIN;
    return -1;
#endif
}

int umbra_lock_exclusive(int fd) {
    return flock(fd, LOCK_EX | LOCK_NB);
}

int umbra_path_exists(const char *path) {
    struct stat info;
    return stat(path, &info) == 0;
}
