//! The labels both program builders jump to. A builder asks for a [`Label`], emits jumps to
//! it by name, binds it where its target instruction goes, and [`Labels::resolve`] turns
//! every jump into an offset at the end: no instruction index is counted or patched by hand.
//! Each builder writes the offsets into its own encoding (classic BPF: `jt`/`jf` as `u8` or
//! `k` for `ja`; eBPF: `off` as `i16`) and reports an offset that does not fit.

/// A jump target, bound to one instruction position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// Why a program could not be assembled (a bug in its builder: the inputs cannot cause it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AsmError {
    #[error("the jump at instruction {at} goes to a label that was never bound")]
    Undefined { at: usize },
    #[error("a label was bound twice (at {first} and {second})")]
    Rebound { first: usize, second: usize },
    #[error("the jump at instruction {at} needs offset {offset}, which its encoding cannot hold")]
    OutOfRange { at: usize, offset: i64 },
}

/// The labels of one program and the jumps to them. `F` says which field of the jumping
/// instruction takes the offset (classic BPF has three).
#[derive(Debug)]
pub(crate) struct Labels<F> {
    bound: Vec<Option<usize>>,
    jumps: Vec<(usize, F, Label)>,
    error: Option<AsmError>,
}

impl<F: Copy> Default for Labels<F> {
    fn default() -> Self {
        Labels { bound: Vec::new(), jumps: Vec::new(), error: None }
    }
}

impl<F: Copy> Labels<F> {
    pub(crate) fn label(&mut self) -> Label {
        self.bound.push(None);
        Label(self.bound.len() - 1)
    }

    /// `label` is the instruction at position `at` (the next one the builder emits).
    pub(crate) fn bind(&mut self, label: Label, at: usize) {
        match self.bound[label.0] {
            Some(first) => {
                self.error.get_or_insert(AsmError::Rebound { first, second: at });
            }
            None => self.bound[label.0] = Some(at),
        }
    }

    /// The instruction at `at` jumps to `to` through its `field`.
    pub(crate) fn jump(&mut self, at: usize, field: F, to: Label) {
        self.jumps.push((at, field, to));
    }

    /// Every jump as (position, field, offset from the instruction after it), the way both
    /// BPF flavours count.
    pub(crate) fn resolve(self) -> Result<Vec<(usize, F, i64)>, AsmError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.jumps
            .iter()
            .map(|&(at, field, to)| {
                let target = self.bound[to.0].ok_or(AsmError::Undefined { at })?;
                Ok((at, field, target as i64 - at as i64 - 1))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_from_the_next_instruction() {
        let mut l = Labels::<()>::default();
        let (fwd, back) = (l.label(), l.label());
        l.bind(back, 0);
        l.jump(1, (), fwd);
        l.jump(2, (), back);
        l.bind(fwd, 5);
        assert_eq!(l.resolve().unwrap(), vec![(1, (), 3), (2, (), -3)]);
    }

    #[test]
    fn an_unbound_or_twice_bound_label_is_an_error() {
        let mut l = Labels::<()>::default();
        let x = l.label();
        l.jump(4, (), x);
        assert_eq!(l.resolve(), Err(AsmError::Undefined { at: 4 }));
        let mut l = Labels::<()>::default();
        let x = l.label();
        l.bind(x, 1);
        l.bind(x, 2);
        assert_eq!(l.resolve(), Err(AsmError::Rebound { first: 1, second: 2 }));
    }
}
