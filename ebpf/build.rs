//! Builds the eBPF objects and the C layout table.
//!
//! - every `src/bpf/*.bpf.c` becomes `$OUT_DIR/<name>.bpf.o` (clang, `-target bpf`);
//! - `src/bpf/layout.c`, a host program including `corral.h`, is compiled and
//!   run; its output (struct sizes, field offsets, constants) becomes
//!   `$OUT_DIR/layout.rs`, which the crate uses for its constants and which
//!   the layout test compares with the `#[repr(C)]` mirrors.
//!
//! The compiler is `clang-19`, or whatever `CORRAL_CLANG` names.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::{env, fs};

const BPF_DIR: &str = "src/bpf";
const HEADER: &str = "corral.h";
const DEFAULT_CLANG: &str = "clang-19";

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-changed={BPF_DIR}");
    println!("cargo:rerun-if-env-changed=CORRAL_CLANG");
    let manifest = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env_var("OUT_DIR")?);
    let bpf_dir = manifest.join(BPF_DIR);
    let clang = env::var("CORRAL_CLANG").unwrap_or_else(|_| DEFAULT_CLANG.to_owned());
    check_clang(&clang)?;

    // asm/types.h lives in the multiarch include directory, which clang does
    // not search for `-target bpf`.
    let arch = env_var("CARGO_CFG_TARGET_ARCH")?;
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    let mut sources: Vec<PathBuf> = fs::read_dir(&bpf_dir)
        .map_err(|e| format!("read {}: {e}", bpf_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no *.bpf.c in {}", bpf_dir.display()));
    }
    for src in &sources {
        let stem = src
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".c"))
            .ok_or_else(|| format!("odd source name {}", src.display()))?;
        let obj = out.join(format!("{stem}.o"));
        let mut cmd = Command::new(&clang);
        cmd.args([
            "-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-I{multiarch}"))
        .arg("-I")
        .arg(&bpf_dir)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj);
        run_cmd(&mut cmd, &format!("compile {}", src.display()))?;
    }

    let layout_bin = out.join("corral-layout");
    let mut cmd = Command::new(&clang);
    cmd.args(["-O0", "-Wall", "-Werror"])
        .arg("-I")
        .arg(&bpf_dir)
        .arg(bpf_dir.join("layout.c"))
        .arg("-o")
        .arg(&layout_bin);
    run_cmd(&mut cmd, "compile layout.c")?;
    let output = run_cmd(&mut Command::new(&layout_bin), "run the layout program")?;
    let layout = parse_layout(&output)?;
    let header =
        fs::read_to_string(bpf_dir.join(HEADER)).map_err(|e| format!("read {HEADER}: {e}"))?;
    check_complete(&layout, &header)?;
    let rust = render(&layout)?;
    fs::write(out.join("layout.rs"), rust).map_err(|e| format!("write layout.rs: {e}"))?;
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

fn check_clang(clang: &str) -> Result<(), String> {
    match Command::new(clang).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{clang} --version failed ({}): install the build dependencies with `cargo xtask deps`",
            out.status
        )),
        Err(e) => Err(format!(
            "{clang} not found ({e}): the eBPF programs are C built with clang; \
             install the build dependencies with `cargo xtask deps` \
             (or set CORRAL_CLANG to a clang with the bpf target)"
        )),
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{what}: output is not UTF-8: {e}"))
}

struct Layout {
    consts: Vec<(String, u64)>,
    structs: Vec<CStruct>,
}

struct CStruct {
    name: String,
    size: usize,
    align: usize,
    fields: Vec<CField>,
}

struct CField {
    name: String,
    offset: usize,
    size: usize,
}

/// Parses the output of layout.c: `const NAME VALUE` lines, and for each
/// struct a `layout NAME SIZE ALIGN` line followed by clang's
/// `__builtin_dump_struct` block (`struct NAME {`, `  TYPE FIELD = VALUE`, `}`).
fn parse_layout(text: &str) -> Result<Layout, String> {
    let mut layout = Layout {
        consts: Vec::new(),
        structs: Vec::new(),
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["const", name, value] => {
                let value = value
                    .parse()
                    .map_err(|e| format!("layout: constant {name}: {e}"))?;
                layout.consts.push(((*name).to_owned(), value));
            }
            ["layout", name, size, align] => layout.structs.push(CStruct {
                name: (*name).to_owned(),
                size: size.parse().map_err(|e| format!("layout: {name}: {e}"))?,
                align: align.parse().map_err(|e| format!("layout: {name}: {e}"))?,
                fields: Vec::new(),
            }),
            ["struct", _, "{"] | ["}"] => {}
            [.., ty, name, "=", value] => {
                let current = layout
                    .structs
                    .last_mut()
                    .ok_or_else(|| format!("layout: field before any struct: {line}"))?;
                let field = measure(&current.name, ty, name, value)?;
                current.fields.push(field);
            }
            _ => return Err(format!("layout: unexpected line {line:?}")),
        }
    }
    Ok(layout)
}

/// Recovers a field's offset from the byte pattern layout.c filled in.
fn measure(st: &str, ty: &str, name: &str, value: &str) -> Result<CField, String> {
    let size = match ty {
        "__u8" => 1,
        "__u16" | "__be16" => 2,
        "__u32" | "__be32" => 4,
        "__u64" | "__be64" => 8,
        _ => {
            return Err(format!(
                "corral.h: {st}.{name} has type {ty}; only fixed-width integer fields \
                 (__u8.. __u64, __be16/32/64) are supported (no arrays, no nested structs)"
            ))
        }
    };
    let value: u64 = value
        .parse()
        .map_err(|e| format!("layout: {st}.{name} = {value}: {e}"))?;
    let offset = (value & 0xff) as usize;
    let expected = (0..size).fold(0u64, |acc, k| {
        acc | (((offset + k) as u64 & 0xff) << (8 * k))
    });
    if value != expected {
        return Err(format!(
            "layout: {st}.{name}: value {value:#x} is not the byte pattern of offset {offset} \
             (big-endian host or a struct larger than 255 bytes?)"
        ));
    }
    Ok(CField {
        name: name.to_owned(),
        offset,
        size,
    })
}

/// Every struct and constant defined in corral.h must be in the table.
fn check_complete(layout: &Layout, header: &str) -> Result<(), String> {
    let have_structs: BTreeSet<&str> = layout.structs.iter().map(|s| s.name.as_str()).collect();
    let have_consts: BTreeSet<&str> = layout.consts.iter().map(|c| c.0.as_str()).collect();
    let mut missing = Vec::new();
    for line in header.lines() {
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .collect();
        match words.as_slice() {
            ["struct", name, "{", ..] if !have_structs.contains(name) => {
                missing.push(format!("struct {name}"));
            }
            ["#define", name, ..] if *name != "CORRAL_H" && !have_consts.contains(name) => {
                missing.push((*name).to_owned());
            }
            [name, "=", ..] if name.starts_with("CORRAL_") && !have_consts.contains(name) => {
                missing.push((*name).to_owned());
            }
            _ => {}
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "src/bpf/layout.c does not cover everything in corral.h; add: {}",
            missing.join(", ")
        ))
    }
}

fn render(layout: &Layout) -> Result<String, String> {
    let mut s = String::from(
        "// @generated by ebpf/build.rs from src/bpf/corral.h (via src/bpf/layout.c).\n\n",
    );
    for (name, value) in &layout.consts {
        let value = u32::try_from(*value)
            .map_err(|_| format!("corral.h: {name} = {value} does not fit in u32"))?;
        let _ = writeln!(s, "pub const {name}: u32 = {value};");
    }
    s.push_str("\npub const C_STRUCTS: &[CStruct] = &[\n");
    for st in &layout.structs {
        let _ = writeln!(
            s,
            "    CStruct {{ name: {:?}, size: {}, align: {}, fields: &[",
            st.name, st.size, st.align
        );
        for f in &st.fields {
            let _ = writeln!(
                s,
                "        CField {{ name: {:?}, offset: {}, size: {} }},",
                f.name, f.offset, f.size
            );
        }
        s.push_str("    ] },\n");
    }
    s.push_str("];\n");
    Ok(s)
}
