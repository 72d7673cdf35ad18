#ifndef UMBRA_CISAL_SHIM_H
#define UMBRA_CISAL_SHIM_H
// ISA-L (Debian's libisal-dev): only its CRC-32C, for catalog batches and preserved chunks.
#include <isa-l/crc.h>
#endif
