//! Micro-benchmarks of access tokens: what a join pays to have its token checked
//! (`auth/verify`: header, issuer lookup, HMAC-SHA256, claims), and minting one (`auth/mint`).
//!
//! `cargo bench --bench auth` (add `-- --quick` for a shorter run).

use criterion::{Criterion, criterion_group, criterion_main};
use plaza::auth::{self, ApiKey, Claims, DEFAULT_TTL, KeySet, Verifier};
use std::hint::black_box;

fn bench_auth(c: &mut Criterion) {
    let key = ApiKey::new("bench-key", "bench-secret-0123456789abcdefghijklmnop");
    let claims = Claims::new("alice-1", "stage", DEFAULT_TTL).with_name("Alice");
    let token = auth::mint(&key, &claims).unwrap();
    let keys: KeySet = [key.clone(), ApiKey::new("other", auth::DEV_API_SECRET)]
        .into_iter()
        .collect();
    let verifier = Verifier::new(keys);
    assert!(verifier.verify(Some(&token), Some("stage")).is_ok());
    c.bench_function("auth/verify", |b| {
        b.iter(|| verifier.verify(black_box(Some(&token)), black_box(Some("stage"))))
    });
    c.bench_function("auth/mint", |b| {
        b.iter(|| auth::mint(black_box(&key), black_box(&claims)))
    });
}

criterion_group!(benches, bench_auth);
criterion_main!(benches);
