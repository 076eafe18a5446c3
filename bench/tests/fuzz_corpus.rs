//! Replays the fuzz corpus kept in the repository (`bench/fuzz/corpus/<target>/`) and
//! every input that once crashed a harness (`bench/fuzz/regressions/<target>/`)
//! through the harnesses, on the stable toolchain: what libFuzzer found stays fixed.

use std::path::Path;

#[test]
fn the_fuzz_corpus_and_every_crash_found_replay_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, harness) in gannet_bench::fuzz::TARGETS {
        let mut seeds = 0;
        for kind in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                eprintln!("{name}: {}", path.display());
                harness(&data);
                // Every prefix too: truncated inputs are what torn writes and cut
                // connections produce.
                for cut in [
                    0,
                    1,
                    data.len() / 3,
                    data.len() / 2,
                    data.len().saturating_sub(1),
                ] {
                    harness(&data[..cut.min(data.len())]);
                }
                seeds += 1;
            }
        }
        assert!(seeds > 0, "no corpus kept for fuzz target {name}");
        replayed += seeds;
    }
    eprintln!("{replayed} inputs replayed");
}
