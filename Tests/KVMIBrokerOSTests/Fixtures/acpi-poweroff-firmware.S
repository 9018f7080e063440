# Test equipment: a 64 KiB firmware image (QEMU -bios, libvirt <loader type='rom'>) for an
# i440fx "pc" guest that does one thing: power off when the ACPI power button is pressed
# (`virsh shutdown`, QMP system_powerdown). A guest with SeaBIOS and no OS ignores the button,
# and SeaBIOS alone takes about a minute to boot under this machine's KVM; this image is
# running a few milliseconds after QEMU starts, and sleeps (HLT, woken by the timer).
#
# Build: as --32 -o fw.o acpi-poweroff-firmware.S
#        ld -m elf_i386 -Ttext 0 -e 0 --oformat binary -o fw.bin fw.o
.code16
start:                          # 0xf000:0x0000 (the image is mapped at 0xf0000 and below 4 GiB)
    cli
    xorw %ax, %ax
    movw %ax, %ss
    movw $0x7000, %sp
    movw %ax, %ds
    movw $tick, 0x20            # IVT entry 8 (IRQ 0 after the remap below) -> 0xf000:tick
    movw $0xf000, 0x22
    movb $0x11, %al             # both 8259s: ICW1, vectors 0x08 and 0x70, cascade, 8086 mode
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x08, %al
    outb %al, $0x21
    movb $0x70, %al
    outb %al, $0xa1
    movb $0x04, %al
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xfe, %al             # only IRQ 0 (the timer) unmasked
    outb %al, $0x21
    movb $0xff, %al
    outb %al, $0xa1
    movb $0x34, %al             # PIT channel 0: rate generator, divisor 65536 (18.2 Hz)
    outb %al, $0x43
    xorb %al, %al
    outb %al, $0x40
    outb %al, $0x40
    movl $0x80000B40, %eax      # PIIX4 PM (PCI 00:01.3) register 0x40 PMBA: I/O base 0x600
    movw $0xcf8, %dx
    outl %eax, %dx
    movl $0x601, %eax
    movw $0xcfc, %dx
    outl %eax, %dx
    movl $0x80000B80, %eax      # register 0x80 PMREGMISC: enable the PM I/O space
    movw $0xcf8, %dx
    outl %eax, %dx
    movb $1, %al
    movw $0xcfc, %dx
    outb %al, %dx
    movw $0x602, %dx            # PM1_EN: PWRBTN_EN
    movw $0x100, %ax
    outw %ax, %dx
    movl $0x1b, %ecx            # IA32_APIC_BASE: disable the local APIC, so that the 8259's
    rdmsr                       # interrupt reaches the CPU (nobody programs LINT0 here)
    andw $0xf7ff, %ax
    wrmsr
    sti
wait:
    hlt
    movw $0x600, %dx            # PM1_STS: PWRBTN_STS?
    inw %dx, %ax
    testw $0x100, %ax
    jz wait
    movw $0x604, %dx            # PM1_CNT: SLP_EN with SLP_TYP 0, QEMU's soft power-off
    movw $0x2000, %ax
    outw %ax, %dx
    jmp wait
tick:                           # the timer's interrupt: acknowledge it, nothing else
    pushw %ax
    movb $0x20, %al
    outb %al, $0x20
    popw %ax
    iret
.org 0xfff0                     # the reset vector (0xfffffff0)
    ljmp $0xf000, $start
.org 0x10000
