//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through
//! the fuzz targets' own bodies, on the stable toolchain: what the fuzzer
//! once found stays fixed, and every target keeps running in plain
//! `cargo test`. A target without a corpus fails.

#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::path::Path;

#[test]
fn every_corpus_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for {name} in {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "the corpus of {name} is empty");
        for input in inputs {
            let bytes = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name} panicked on {}", input.display());
        }
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for (name, _) in targets::TARGETS {
        let file = root.join(format!("{name}.rs"));
        assert!(file.exists(), "no {}", file.display());
    }
}
