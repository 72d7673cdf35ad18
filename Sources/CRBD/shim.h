#ifndef UMBRA_CRBD_SHIM_H
#define UMBRA_CRBD_SHIM_H
// librbd-dev ships no pkg-config file: the module map links librbd and librados by name.
#include <rados/librados.h>
#include <rbd/librbd.h>
#endif
