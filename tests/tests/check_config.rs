//! `slb check-config` accepts the test config and rejects bad fields, naming them.

use std::process::Command;

use slb_tests::slb::slb_binary;
use slb_tests::SlbConfig;

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("slb.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(slb_binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run slb check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_good_and_names_bad_fields() {
    let good = SlbConfig::standard("cc", &[1, 2, 3]);
    let (ok, out) = check_config(&good.to_toml());
    assert!(ok, "a valid config was rejected:\n{out}");

    let mut not_prime = good.clone();
    not_prime.maglev_table_size = 65536;
    let (ok, out) = check_config(&not_prime.to_toml());
    assert!(
        !ok,
        "maglev_table_size 65536 (not prime) was accepted:\n{out}"
    );
    assert!(
        out.contains("maglev_table_size"),
        "error does not name the field:\n{out}"
    );

    let mut bad_protocol = good.to_toml_value();
    *bad_protocol
        .get_mut("listeners")
        .and_then(|l| l.get_mut(1))
        .and_then(|l| l.get_mut("protocol"))
        .expect("listeners[1].protocol") = toml::Value::String("sctp".to_owned());
    let (ok, out) = check_config(&toml::to_string(&bad_protocol).expect("render TOML"));
    assert!(!ok, "protocol sctp was accepted:\n{out}");
    assert!(
        out.contains("protocol"),
        "error does not name the field:\n{out}"
    );
}

/// With a listener that uses cookies, check-config reads the cookie secret `slb run` would:
/// a short one is refused naming the file, a missing one is reported (and not created).
#[test]
fn check_config_reads_the_cookie_secret_it_will_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("cookie-secret");
    let text = |secret: &std::path::Path| {
        format!(
            "instance = \"cc\"\ncookie_secret_file = \"{}\"\n[[interfaces]]\nname = \"eth0\"\n\
             [[listeners]]\nname = \"web\"\nprotocol = \"http\"\nvip = \"192.0.2.10\"\nport = 80\n\
             cookie = {{ mode = \"insert\" }}\n\
             [default_group]\nbackends = [{{ address = \"198.51.100.11\" }}]\n",
            secret.display()
        )
    };
    let (ok, out) = check_config(&text(&secret));
    assert!(
        ok,
        "a missing secret (slb run creates it) was refused:\n{out}"
    );
    assert!(out.contains("missing"), "{out}");
    assert!(!secret.exists(), "check-config created the secret");

    std::fs::write(&secret, "short\n").expect("write secret");
    let (ok, out) = check_config(&text(&secret));
    assert!(!ok, "a 5-byte secret was accepted:\n{out}");
    assert!(
        out.contains(&secret.display().to_string()) && out.contains("5 bytes"),
        "the error does not name the file and its size:\n{out}"
    );

    std::fs::write(&secret, "a secret of more than sixteen bytes\n").expect("write secret");
    let (ok, out) = check_config(&text(&secret));
    assert!(ok && out.contains("cookie secret"), "{out}");
}
