/* sd_notify(3) from libsystemd: the reference implementation of the service notification
 * protocol (READY=1, RELOADING=1, STOPPING=1, STATUS=). Only sd_notify is used: it is not
 * variadic, so Swift imports it directly (sd_notifyf is variadic and is not used). */
#include <systemd/sd-daemon.h>
