// The few Linux calls that Swift's Glibc module does not import (they need _GNU_SOURCE or
// linux/ headers). Only BlockIO uses this target.
#ifndef UMBRA_CBLOCKIO_H
#define UMBRA_CBLOCKIO_H

#include <stdint.h>
#include <sys/types.h>

/// fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. Returns 0 or -1 with errno set.
int umbra_punch_hole(int fd, int64_t offset, int64_t length);

/// fallocate(2) with mode 0: allocates the range (extending the size past the end). Returns 0 or -1
/// with errno set.
int umbra_allocate(int fd, int64_t offset, int64_t length);

/// fallocate(2) with FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE. Returns 0 or -1 with errno set.
int umbra_zero_range(int fd, int64_t offset, int64_t length);

/// ioctl(BLKGETSIZE64). Returns 0 or -1 with errno set.
int umbra_block_device_size(int fd, uint64_t *size);

/// ioctl(FICLONERANGE): makes `length` bytes of `destination` at `destination_offset` share the file
/// system's blocks with `source`'s at `source_offset` (a length of 0 means "to the end of source").
/// Returns 0 or -1 with errno set.
int umbra_clone_range(int destination, int source, uint64_t source_offset, uint64_t length, uint64_t destination_offset);

/// lseek(2) with SEEK_DATA / SEEK_HOLE. Returns the offset or -1 with errno set.
int64_t umbra_seek_data(int fd, int64_t offset);
int64_t umbra_seek_hole(int fd, int64_t offset);

/// preadv2(2) with RWF_NOWAIT: reads only what the page cache holds. Returns bytes read, or -1 with
/// errno set (EAGAIN when the data is not cached).
ssize_t umbra_pread_nowait(int fd, void *buffer, size_t count, int64_t offset);

/// flock(2) with LOCK_EX | LOCK_NB. Returns 0, or -1 with errno set (EWOULDBLOCK when held).
int umbra_lock_exclusive(int fd);

/// stat(2): 1 if something exists at path, else 0.
int umbra_path_exists(const char *path);

#endif
