//! JACK and ALSA reached through shared libraries loaded at run time (`dlopen` through
//! `libloading`), so that building the node needs nothing but Rust: no pkg-config entry, no
//! `-dev` package, no libjack on the build machine.
//!
//! Each library is opened once per process, on first use, and never unloaded: every function
//! pointer taken from it stays valid for the life of the process. A library that is missing,
//! or that lacks a required function, is an ordinary error naming it and saying what to
//! install ([`jack::JackError::NotInstalled`], [`alsa::AlsaError::NotInstalled`]); nothing
//! else is touched then.
//!
//! The C declarations are written here from the libraries' public API documentation (JACK's
//! `jack/jack.h` and `jack/types.h`, alsa-lib's PCM interface).

#![deny(missing_docs)]

/// Declares a table of C functions taken from a shared library, and `Api::from_library`,
/// which resolves every one of them (`required`: all must exist) or `None` (`optional`).
///
/// The field names are the C symbol names. Resolving is `unsafe`: the declared types must
/// match the C functions'.
macro_rules! dl_api {
    (
        struct $name:ident {
            required { $( $field:ident : $ty:ty, )* }
            optional { $( $ofield:ident : $oty:ty, )* }
        }
    ) => {
        #[allow(non_snake_case)]
        struct $name {
            $( $field: $ty, )*
            $( $ofield: Option<$oty>, )*
            /// Keeps the library mapped (never dropped: the table lives in a static).
            _lib: libloading::Library,
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }

        impl $name {
            /// Resolves the functions in `lib`; on failure, the missing symbol and the
            /// loader's message.
            ///
            /// # Safety
            /// The declared function types must match the library's C declarations.
            unsafe fn from_library(
                lib: libloading::Library,
            ) -> Result<Self, (&'static str, String)> {
                $(
                    // SAFETY: the caller vouches that the declared type is the C one; a fn
                    // pointer is `Copy`, and the library outlives it (moved into the table).
                    let $field: $ty = unsafe {
                        *lib.get::<$ty>(concat!(stringify!($field), "\0").as_bytes())
                            .map_err(|e| (stringify!($field), e.to_string()))?
                    };
                )*
                $(
                    // SAFETY: as above.
                    let $ofield: Option<$oty> = unsafe {
                        lib.get::<$oty>(concat!(stringify!($ofield), "\0").as_bytes())
                            .ok()
                            .map(|s| *s)
                    };
                )*
                Ok($name {
                    $( $field, )*
                    $( $ofield, )*
                    _lib: lib,
                })
            }
        }
    };
}

pub mod alsa;
pub mod jack;

use std::ffi::{CStr, c_char};

/// Copies a C string the library owns (`NULL` → empty).
///
/// # Safety
/// `p` is `NULL` or points to a NUL-terminated string valid for the duration of the call.
unsafe fn owned_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
