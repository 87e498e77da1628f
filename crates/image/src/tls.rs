//! The one TLS set-up every binary needs: rustls with the `ring` provider (see the dependency
//! notes: the ecosystem defaults to aws-lc-rs, which we keep out of the build).

/// Makes `ring` the process-wide rustls provider, once; later calls (and a provider someone
/// installed before) are fine.
pub fn install_default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means a provider is installed already, which is what we want.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
