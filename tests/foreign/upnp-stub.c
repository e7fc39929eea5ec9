/*
 * A stand-in for libgupnp-igd-1.0.so.4 (GUPnP's UPnP Internet Gateway Device client), so that
 * Debian 12's simple-whip-client (`whip-client`) can start at all.
 *
 * Why: whip-client links libsoup 2.4. Debian's libnice (ICE for GStreamer's webrtcbin) links
 * libgupnp-igd, which links libgupnp 1.6, which links libsoup 3. Both libsoups in one process
 * abort it at start ("libsoup2 symbols detected. Using libsoup2 and libsoup3 in the same process
 * is not supported"). This library has the same soname, the four functions libnice calls and
 * no dependencies; scripts/foreign-tests.sh builds it into target/ and run.py starts whip-client
 * with LD_LIBRARY_PATH pointing there, so the dynamic loader takes it instead of the real one and
 * libsoup 3 is never loaded.
 *
 * What changes: libnice asks UPnP gateways to map ports only through these calls; with
 * gupnp_simple_igd_thread_new() returning NULL it maps none (it checks for NULL and goes on).
 * It gathers host candidates and does ICE, DTLS and RTP exactly as before: nothing here is on
 * the media path, and the tests run in a network namespace without any UPnP gateway anyway.
 *
 *   cc -shared -fPIC -Wl,-soname,libgupnp-igd-1.0.so.4 -o DIR/libgupnp-igd-1.0.so.4 upnp-stub.c
 */
typedef unsigned long GType;

/* No IGD client: libnice then never maps ports. */
void *gupnp_simple_igd_thread_new(void) { return 0; }

GType gupnp_simple_igd_get_type(void) { return 0; }

void gupnp_simple_igd_add_port(void *igd, const char *protocol, unsigned external_port, const char *local_ip,
                               unsigned local_port, unsigned lease_duration, const char *description) {
  (void)igd, (void)protocol, (void)external_port, (void)local_ip, (void)local_port, (void)lease_duration,
      (void)description;
}

void gupnp_simple_igd_remove_port_local(void *igd, const char *protocol, const char *local_ip, unsigned local_port) {
  (void)igd, (void)protocol, (void)local_ip, (void)local_port;
}
