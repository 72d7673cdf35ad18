#ifndef UMBRA_CNBD_SHIM_H
#define UMBRA_CNBD_SHIM_H
#include <libnbd.h>
#endif
