/* A stand-in libnvidia-ml.so.1 for tests, built against NVIDIA's nvml.h (nvidia-nvml-dev).
 * FAKE_NVML_GPUS sets the device count (default 2). Device 0 reports MIG disabled and a
 * 400 W power limit; device 1 answers NOT_SUPPORTED to both, like a consumer board. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nvml.h"

static int initialised = 0;

static unsigned int device_count(void) {
    const char *value = getenv("FAKE_NVML_GPUS");
    return value ? (unsigned int)atoi(value) : 2u;
}

static int index_of(nvmlDevice_t device) { return (int)(long)device - 1; }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; initialised = 1; return NVML_SUCCESS; }
nvmlReturn_t nvmlInit_v2(void) { initialised = 1; return NVML_SUCCESS; }
nvmlReturn_t nvmlShutdown(void) { initialised = 0; return NVML_SUCCESS; }
const char *nvmlErrorString(nvmlReturn_t result) { return result == NVML_ERROR_NOT_SUPPORTED ? "Not Supported" : "fake error"; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = device_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= device_count()) return NVML_ERROR_INVALID_ARGUMENT;
    *device = (nvmlDevice_t)(long)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    snprintf(name, length, "%s", index_of(device) == 0 ? "NVIDIA H100 80GB HBM3" : "NVIDIA GeForce RTX 4090");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    snprintf(uuid, length, "GPU-fa4e0000-0000-0000-0000-00000000000%d", index_of(device));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    memory->total = index_of(device) == 0 ? 85899345920ULL : 25757220864ULL;
    memory->used = 1ULL << 20;
    memory->free = memory->total - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor) {
    *major = index_of(device) == 0 ? 9 : 8;
    *minor = index_of(device) == 0 ? 0 : 9;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    memset(pci, 0, sizeof(*pci));
    pci->bus = 0x18 + (unsigned int)index_of(device);
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "0000:%02X:00.0", pci->bus);
    snprintf(pci->busId, sizeof(pci->busId), "00000000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    if (index_of(device) != 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = NVML_DEVICE_MIG_DISABLE;
    *pending = NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    if (index_of(device) != 0) return NVML_ERROR_NOT_SUPPORTED;
    *limit = 400000;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    snprintf(version, length, "%s", "550.54.15");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) { *version = 12040; return NVML_SUCCESS; }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { *version = 12040; return NVML_SUCCESS; }
