# A guest for checks by hand with real Firecracker: no Linux, just an ELF
# that Firecracker boots in 64-bit mode. It prints a banner with a boot
# line ("login: booted"), then "tick N" on its serial console, counting
# for ever. A copy restored from a snapshot goes on counting from where
# the source was, which shows that it runs the source's memory.
#   as tick.S -o tick.o && ld -T guest.ld tick.o -o tick-vmlinux
    .globl _start
    .text
_start:
    lea banner(%rip), %rsi
    mov $bannerlen, %rcx
    call puts
    xor %r12, %r12
tick:
    inc %r12
    lea tickmsg(%rip), %rsi
    mov $5, %rcx
    call puts
    mov %r12, %rax
    call putdec
    lea crlf(%rip), %rsi
    mov $2, %rcx
    call puts
    # A pause between ticks (a few per second on the build host).
    mov $50000, %rbx
1:  dec %rbx
    jnz 1b
    jmp tick
# Writes rcx bytes from rsi to the serial port.
puts:
    mov $0x3f8, %dx
2:  lodsb
    outb %al, %dx
    loop 2b
    ret
# Writes rax in decimal.
putdec:
    lea buf+20(%rip), %rdi
    mov $10, %rbx
    xor %rcx, %rcx
3:  xor %rdx, %rdx
    div %rbx
    add $48, %dl
    dec %rdi
    mov %dl, (%rdi)
    inc %rcx
    test %rax, %rax
    jnz 3b
    mov %rdi, %rsi
    jmp puts
    .data
banner: .ascii "tick guest booted\r\nlogin: booted\r\n"
    bannerlen = . - banner
tickmsg: .ascii "tick "
crlf: .ascii "\r\n"
buf: .space 24
