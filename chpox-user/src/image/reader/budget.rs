//! Decoding within a memory budget.
//!
//! CBOR is compact: a one-byte item can become a 24-byte `String` or a
//! 32-byte value that serde buffers (the root's fields are buffered, being
//! `#[serde(flatten)]`), and a declared length lets a vector reserve room
//! before a single element is read. So the bytes of the metadata do not
//! bound the memory of decoding it. [`Budgeted`] decodes through a
//! deserializer that sits between the CBOR decoder and the model's
//! `Deserialize` code and, before each element of a sequence, each entry
//! of a map and each string or byte string reaches the code that stores
//! it, counts its size (twice that of an element, for the slack of a
//! growing vector) against [`format::MAX_META_DECODED`]; past that, the
//! decode fails. It also hides every declared length (`size_hint`), so no
//! vector is reserved from a count the input merely claims.
//!
//! What is counted is what the decode allocates, give or take the
//! allocator's own overhead and the final values serde builds from what it
//! buffered (both at most about as much again), so the real peak stays
//! within a small factor of the budget whatever the input.

use std::cell::Cell;
use std::fmt;
use std::mem::size_of;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use super::format::MAX_META_DECODED;

/// The message of the error that ends a decode over budget.
pub(crate) const OVER_BUDGET: &str = "chpox: metadata over its memory budget";

/// Bytes still allowed.
struct Budget {
    left: Cell<u64>,
    /// A charge was refused.
    exceeded: Cell<bool>,
}

impl Budget {
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.left.get().checked_sub(bytes as u64) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.exceeded.set(true);
                Err(E::custom(OVER_BUDGET))
            }
        }
    }

    /// An element of a growing vector: its size twice.
    fn element<T, E: de::Error>(&self) -> Result<(), E> {
        self.charge(2 * size_of::<T>())
    }
}

/// `T` decoded within [`MAX_META_DECODED`] bytes; fails with
/// [`OVER_BUDGET`] past that.
pub(crate) struct Budgeted<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Budgeted<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let budget = Budget {
            left: Cell::new(MAX_META_DECODED),
            exceeded: Cell::new(false),
        };
        budget.charge::<D::Error>(size_of::<T>())?;
        let metered = Meter {
            de,
            budget: &budget,
        };
        match T::deserialize(metered) {
            Ok(v) => Ok(Budgeted(v)),
            // Whatever the error says by the time it comes back, the
            // budget ran out: say that.
            Err(_) if budget.exceeded.get() => Err(de::Error::custom(OVER_BUDGET)),
            Err(e) => Err(e),
        }
    }
}

/// A deserializer that meters what its visitors receive.
struct Meter<'b, D> {
    de: D,
    budget: &'b Budget,
}

/// A visitor whose sequences, maps, enums and strings are metered.
struct Metered<'b, V> {
    inner: V,
    budget: &'b Budget,
    /// A map is a struct's fields (stored in the struct, already
    /// counted with it), not a collection.
    fields: bool,
}

impl<'b, V> Metered<'b, V> {
    fn new(inner: V, budget: &'b Budget) -> Self {
        Metered {
            inner,
            budget,
            fields: false,
        }
    }

    fn fields(inner: V, budget: &'b Budget) -> Self {
        Metered {
            inner,
            budget,
            fields: true,
        }
    }
}

struct MeteredSeed<'b, S> {
    seed: S,
    budget: &'b Budget,
}

struct MeteredSeq<'b, A> {
    seq: A,
    budget: &'b Budget,
}

struct MeteredMap<'b, A> {
    map: A,
    budget: &'b Budget,
    fields: bool,
}

struct MeteredEnum<'b, A> {
    data: A,
    budget: &'b Budget,
}

macro_rules! forward_deserialize {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.de.$method(Metered::new(visitor, self.budget))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Meter<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any deserialize_bool
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
        deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
        deserialize_option deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_unit_struct(name, Metered::new(visitor, self.budget))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_newtype_struct(name, Metered::new(visitor, self.budget))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_tuple(len, Metered::new(visitor, self.budget))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_tuple_struct(name, len, Metered::new(visitor, self.budget))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_struct(name, fields, Metered::fields(visitor, self.budget))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_enum(name, variants, Metered::new(visitor, self.budget))
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident: $ty:ty)*) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Metered<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool: bool
        visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64 visit_i128: i128
        visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64 visit_u128: u128
        visit_f32: f32 visit_f64: f64 visit_char: char
    }

    // Strings and byte strings: their bytes, which the visitor may copy.
    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.inner.visit_str(v)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.inner.visit_borrowed_str(v)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.budget.charge(v.capacity())?;
        self.inner.visit_string(v)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.inner.visit_bytes(v)
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.budget.charge(v.len())?;
        self.inner.visit_borrowed_bytes(v)
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.budget.charge(v.capacity())?;
        self.inner.visit_byte_buf(v)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Meter {
            de,
            budget: self.budget,
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Meter {
            de,
            budget: self.budget,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(MeteredSeq {
            seq,
            budget: self.budget,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(MeteredMap {
            map,
            budget: self.budget,
            fields: self.fields,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(MeteredEnum {
            data,
            budget: self.budget,
        })
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for MeteredSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Meter {
            de,
            budget: self.budget,
        })
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for MeteredSeq<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.budget.element::<T::Value, A::Error>()?;
        self.seq.next_element_seed(MeteredSeed {
            seed,
            budget: self.budget,
        })
    }

    /// None: a declared length is a claim, not room to reserve.
    fn size_hint(&self) -> Option<usize> {
        None
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for MeteredMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        if !self.fields {
            self.budget.element::<K::Value, A::Error>()?;
        }
        self.map.next_key_seed(MeteredSeed {
            seed,
            budget: self.budget,
        })
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        if !self.fields {
            self.budget.element::<T::Value, A::Error>()?;
        }
        self.map.next_value_seed(MeteredSeed {
            seed,
            budget: self.budget,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        None
    }
}

impl<'de, 'b, A: EnumAccess<'de>> EnumAccess<'de> for MeteredEnum<'b, A> {
    type Error = A::Error;
    type Variant = MeteredVariant<'b, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let (value, variant) = self.data.variant_seed(MeteredSeed {
            seed,
            budget: self.budget,
        })?;
        Ok((
            value,
            MeteredVariant {
                variant,
                budget: self.budget,
            },
        ))
    }
}

pub(crate) struct MeteredVariant<'b, A> {
    variant: A,
    budget: &'b Budget,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for MeteredVariant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.variant.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        self.variant.newtype_variant_seed(MeteredSeed {
            seed,
            budget: self.budget,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.variant
            .tuple_variant(len, Metered::new(visitor, self.budget))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.variant
            .struct_variant(fields, Metered::fields(visitor, self.budget))
    }
}
