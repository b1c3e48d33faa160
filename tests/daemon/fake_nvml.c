/* A stand-in libnvidia-ml.so.1 for tests, built against NVIDIA's nvml.h (nvidia-nvml-dev).
 *
 * FAKE_NVML_GPUS sets the device count (default 2). Device 0 is an H100 reporting MIG
 * disabled and a 400 W power limit; device 1 an RTX 4090 answering NOT_SUPPORTED to both.
 *
 * Telemetry comes from the KEY=VALUE file named by FAKE_NVML_STATE, re-read whenever it
 * changed (inode, size or mtime; write it with a rename). Keys, <i> being a device index:
 *   devices=0,1            devices present; an absent one is NOT_FOUND by UUID and
 *                          GPU_IS_LOST to every query (default: all)
 *   <i>.util_gpu  <i>.util_mem  <i>.mem_used  <i>.temp  <i>.power_mw  <i>.sm_clock
 *   <i>.ecc_corrected  <i>.ecc_uncorrected  <i>.clocks_event_reasons
 *   <i>.processes=PID:BYTES,...   compute processes
 *   <i>.xids=79,48         XIDs raised so far; each is delivered once by nvmlEventSetWait
 *   <i>.unsupported=temp,ecc,...  queries answering NOT_SUPPORTED (names as above, plus
 *                          util, processes, events)
 * Without the file every value is 0, except mem_used (1 MiB). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include "nvml.h"

#define MAX_DEVICES 16
#define STATE_BYTES 65536

static int initialised = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char state[STATE_BYTES];
static struct stat state_stat;
static int state_loaded = 0;
static unsigned int xids_delivered[MAX_DEVICES];

struct nvmlEventSet_st { unsigned long long registered[MAX_DEVICES]; };

static unsigned int device_count(void) {
    const char *value = getenv("FAKE_NVML_GPUS");
    unsigned int count = value ? (unsigned int)atoi(value) : 2u;
    return count > MAX_DEVICES ? MAX_DEVICES : count;
}

static int index_of(nvmlDevice_t device) { return (int)(long)device - 1; }

/* Re-reads the state file if it changed; caller holds `lock`. */
static void load_state(void) {
    const char *path = getenv("FAKE_NVML_STATE");
    struct stat now;
    if (!path || stat(path, &now) != 0) { state[0] = 0; state_loaded = 0; return; }
    if (state_loaded && now.st_ino == state_stat.st_ino && now.st_size == state_stat.st_size &&
        now.st_mtim.tv_sec == state_stat.st_mtim.tv_sec &&
        now.st_mtim.tv_nsec == state_stat.st_mtim.tv_nsec) return;
    FILE *file = fopen(path, "r");
    if (!file) { state[0] = 0; state_loaded = 0; return; }
    size_t n = fread(state, 1, STATE_BYTES - 1, file);
    fclose(file);
    state[n] = 0;
    state_stat = now;
    state_loaded = 1;
}

/* Copies the value of `key` into `out`; 0 when the key is absent. */
static int lookup(const char *key, char *out, size_t size) {
    size_t klen = strlen(key);
    int found = 0;
    pthread_mutex_lock(&lock);
    load_state();
    for (const char *line = state; *line; ) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        if (len > klen && strncmp(line, key, klen) == 0 && line[klen] == '=') {
            size_t vlen = len - klen - 1;
            if (vlen >= size) vlen = size - 1;
            memcpy(out, line + klen + 1, vlen);
            out[vlen] = 0;
            found = 1;
            break;
        }
        line += len + (end ? 1 : 0);
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static unsigned long long number(int index, const char *name, unsigned long long fallback) {
    char key[64], value[64];
    snprintf(key, sizeof(key), "%d.%s", index, name);
    return lookup(key, value, sizeof(value)) ? strtoull(value, NULL, 10) : fallback;
}

/* Whether `name` is in the comma-separated list under `key` (absent key: `fallback`). */
static int listed(const char *key, const char *name, int fallback) {
    char value[1024];
    if (!lookup(key, value, sizeof(value))) return fallback;
    char *rest = NULL;
    for (char *item = strtok_r(value, ", ", &rest); item; item = strtok_r(NULL, ", ", &rest))
        if (strcmp(item, name) == 0) return 1;
    return 0;
}

static int present(int index) {
    char name[16];
    snprintf(name, sizeof(name), "%d", index);
    return index >= 0 && (unsigned int)index < device_count() && listed("devices", name, 1);
}

static int unsupported(int index, const char *query) {
    char key[32];
    snprintf(key, sizeof(key), "%d.unsupported", index);
    return listed(key, query, 0);
}

/* The check every telemetry query starts with. */
#define QUERY(device, name)                                                   \
    int i = index_of(device);                                                 \
    if (!present(i)) return NVML_ERROR_GPU_IS_LOST;                           \
    if (unsupported(i, name)) return NVML_ERROR_NOT_SUPPORTED

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; initialised++; return NVML_SUCCESS; }
nvmlReturn_t nvmlInit_v2(void) { initialised++; return NVML_SUCCESS; }
nvmlReturn_t nvmlShutdown(void) {
    if (initialised == 0) return NVML_ERROR_UNINITIALIZED;
    initialised--;
    return NVML_SUCCESS;
}
const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "fake error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = device_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= device_count()) return NVML_ERROR_INVALID_ARGUMENT;
    if (!present((int)index)) return NVML_ERROR_GPU_IS_LOST;
    *device = (nvmlDevice_t)(long)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    snprintf(uuid, length, "GPU-fa4e0000-0000-0000-0000-%012d", index_of(device));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    char candidate[96];
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    for (unsigned int index = 0; index < device_count(); index++) {
        nvmlDevice_t handle = (nvmlDevice_t)(long)(index + 1);
        nvmlDeviceGetUUID(handle, candidate, sizeof(candidate));
        if (strcmp(candidate, uuid) == 0 && present((int)index)) {
            *device = handle;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    snprintf(name, length, "%s", index_of(device) == 0 ? "NVIDIA H100 80GB HBM3" : "NVIDIA GeForce RTX 4090");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    QUERY(device, "mem_used");
    memory->total = i == 0 ? 85899345920ULL : 25757220864ULL;
    memory->used = number(i, "mem_used", 1ULL << 20);
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

/* ---- telemetry ---------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    QUERY(device, "util");
    utilization->gpu = (unsigned int)number(i, "util_gpu", 0);
    utilization->memory = (unsigned int)number(i, "util_mem", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensor, unsigned int *temp) {
    QUERY(device, "temp");
    if (sensor != NVML_TEMPERATURE_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = (unsigned int)number(i, "temp", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    QUERY(device, "power_mw");
    *power = (unsigned int)number(i, "power_mw", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock) {
    QUERY(device, "sm_clock");
    if (type != NVML_CLOCK_SM) return NVML_ERROR_NOT_SUPPORTED;
    *clock = (unsigned int)number(i, "sm_clock", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t type,
                                         nvmlEccCounterType_t counter, unsigned long long *count) {
    QUERY(device, "ecc");
    if (counter != NVML_VOLATILE_ECC) return NVML_ERROR_INVALID_ARGUMENT;
    *count = number(i, type == NVML_MEMORY_ERROR_TYPE_CORRECTED ? "ecc_corrected" : "ecc_uncorrected", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    QUERY(device, "clocks_event_reasons");
    *reasons = number(i, "clocks_event_reasons", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    char key[32], value[2048];
    unsigned int found = 0, capacity = *count;
    QUERY(device, "processes");
    snprintf(key, sizeof(key), "%d.processes", i);
    if (lookup(key, value, sizeof(value))) {
        char *rest = NULL;
        for (char *item = strtok_r(value, ", ", &rest); item; item = strtok_r(NULL, ", ", &rest)) {
            char *colon = strchr(item, ':');
            if (infos && found < capacity) {
                memset(&infos[found], 0, sizeof(infos[found]));
                infos[found].pid = (unsigned int)strtoul(item, NULL, 10);
                infos[found].usedGpuMemory = colon ? strtoull(colon + 1, NULL, 10) : 0;
                infos[found].gpuInstanceId = 0xFFFFFFFF;
                infos[found].computeInstanceId = 0xFFFFFFFF;
            }
            found++;
        }
    }
    *count = found;
    if (found > capacity || (found > 0 && !infos)) return NVML_ERROR_INSUFFICIENT_SIZE;
    return NVML_SUCCESS;
}

/* ---- events (XIDs) ------------------------------------------------------------------ */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    *set = calloc(1, sizeof(struct nvmlEventSet_st));
    return *set ? NVML_SUCCESS : NVML_ERROR_MEMORY;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { free(set); return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    QUERY(device, "events");
    set->registered[i] |= types;
    return NVML_SUCCESS;
}

/* The next XID of a registered device not delivered yet; 0 when there is none. */
static unsigned long long next_xid(nvmlEventSet_t set, int *device) {
    char key[32], value[1024];
    for (int index = 0; index < (int)device_count(); index++) {
        if (!(set->registered[index] & nvmlEventTypeXidCriticalError)) continue;
        snprintf(key, sizeof(key), "%d.xids", index);
        if (!lookup(key, value, sizeof(value))) continue;
        unsigned int position = 0;
        char *rest = NULL;
        for (char *item = strtok_r(value, ", ", &rest); item;
             item = strtok_r(NULL, ", ", &rest), position++) {
            if (position == xids_delivered[index]) {
                xids_delivered[index]++;
                *device = index;
                return strtoull(item, NULL, 10);
            }
        }
    }
    return 0;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    struct timespec pause = {0, 10 * 1000 * 1000};
    for (unsigned int waited = 0;; waited += 10) {
        int device = -1;
        unsigned long long xid = next_xid(set, &device);
        if (xid) {
            memset(data, 0, sizeof(*data));
            data->device = (nvmlDevice_t)(long)(device + 1);
            data->eventType = nvmlEventTypeXidCriticalError;
            data->eventData = xid;
            data->gpuInstanceId = 0xFFFFFFFF;
            data->computeInstanceId = 0xFFFFFFFF;
            return NVML_SUCCESS;
        }
        if (waited >= timeoutms) return NVML_ERROR_TIMEOUT;
        nanosleep(&pause, NULL);
    }
}
