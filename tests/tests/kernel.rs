//! The feature probes against what is known of the kernel the suite runs on: `cargo xtask
//! vm-test` sets `PXT_EXPECT_FEATURES` for each Debian kernel it boots; elsewhere every feature
//! is expected (this project's machines run 6.18). A wrong probe would otherwise pass every
//! test that asks the probe what to expect.

use proxy_agent::features::{Feature, Features};
use proxy_tests::host::require_root;

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_probes_find_what_this_kernel_has() {
    require_root();
    let expected = std::env::var("PXT_EXPECT_FEATURES").unwrap_or_default();
    let probed = Features::probe();
    for f in Feature::ALL {
        let want = !expected
            .split_whitespace()
            .any(|w| w == format!("{}=no", f.name()));
        assert_eq!(
            probed.has(f),
            want,
            "{}: probed {probed} (PXT_EXPECT_FEATURES={expected:?} lists what this kernel lacks)",
            f.name()
        );
    }
}
